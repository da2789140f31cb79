"""Compile every Triton kernel of sala_train.kernels for a GPU on a machine without one, and report registers
and spills per kernel.

    python -m sala_train.kernels.compile_check            # sm_90 (H100 / H200)
    python -m sala_train.kernels.compile_check --arch 80  # A100

The interpreter (TRITON_INTERPRET=1, the CPU tests) accepts code that the GPU compiler refuses, e.g. a
variable given another shape inside an ``if`` or a reassigned constexpr; those errors otherwise first show on
the GPU machine. Here the ops' host functions run on CPU tensors at the release shapes (bf16, head_dim 128,
16 query heads per KV head, the official selection sizes), with every kernel launch replaced by its
compilation through Triton's bundled ptxas: nothing is computed, the outputs stay uninitialised. Needs a
process without TRITON_INTERPRET=1 (the test starts one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from . import INTERPRET


class _CompileOnlyDriver:
    """Just what JITFunction.run asks of the active driver before it launches: a device, a stream, the target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[dict]:
    """Inside: launching a @triton.jit kernel compiles it for sm_<arch> and returns without running it.
    Yields {kernel name: [compiled kernels]} (one entry per distinct specialisation compiled)."""
    if INTERPRET:
        raise RuntimeError("compile_only needs a process without TRITON_INTERPRET=1 (the kernels are interpreted "
                           "functions there, not compiled ones)")
    compiled: dict = {}
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.setdefault(self.fn.__name__, [])
        if kernel is not None and all(kernel is not k for k in compiled[self.fn.__name__]):
            compiled[self.fn.__name__].append(kernel)
        return kernel

    previous = driver._active  # None where no GPU driver exists (reading driver.active would fail there)
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    try:
        yield compiled
    finally:
        JITFunction.run = original_run
        driver._active = previous


def _ptxas_info(kernel, arch: int) -> dict:
    """Registers and spill bytes of a compiled kernel, from ptxas -v on its PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None,
            "shared_bytes": kernel.metadata.shared}


def compile_all(arch: int = 90) -> dict:
    """Run the host side of every op once (forward and backward where there is one) under compile_only.
    Returns {kernel name: [compiled kernels]}."""
    from .fused import _NormRope
    from .lightning.chunk import chunk_lightning_attention
    from .lightning.recurrent import decode_lightning_attention
    from .sparse import select as select_module
    from .sparse.attention import triton_sparse_attention, triton_sparse_decode
    from .sparse.select import triton_select_blocks

    bf16 = torch.bfloat16
    T, H, D = 300, 4, 128
    with compile_only(arch) as compiled:
        # lightning: forward + backward with an initial and a final state (all kernels), two documents
        q, k, v = (torch.zeros(T, H, D, dtype=bf16, requires_grad=True) for _ in range(3))
        h0 = torch.zeros(2, H, D, D, requires_grad=True)
        decay = -torch.linspace(0.01, 0.9, H)
        o, final = chunk_lightning_attention(q, k, v, decay, D**-0.5, h0, True, [0, 100, T], block_len=128)
        torch.autograd.backward((o, final), (torch.zeros_like(o), torch.zeros_like(final)))
        decode_lightning_attention(q[:2].detach(), k[:2].detach(), v[:2].detach(), decay,
                                   torch.zeros(2, H, D, D), D**-0.5)
        # InfLLM-V2: 32 query / 2 KV heads, block 64, windows 32/16, init 1 + local 32 + top-64; both merges
        Hq, Hk = 32, 2
        qs = torch.zeros(T, Hq, D, dtype=bf16, requires_grad=True)
        ks, vs = (torch.zeros(T, Hk, D, dtype=bf16, requires_grad=True) for _ in range(2))
        sel = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, local_blocks=32, topk=64,
                   scale=D**-0.5)
        for merge in ("sort", "bitonic"):
            select_module.SELECT_OVERRIDES["merge"] = merge
            try:
                idx = triton_select_blocks(qs.detach(), ks.detach(), [0, T], **sel)
            finally:
                select_module.SELECT_OVERRIDES.pop("merge")
        idx.copy_(torch.arange(97, dtype=torch.int32).clamp(max=4).expand_as(idx))  # blocks 0-4: non-empty tiles
        o = triton_sparse_attention(qs, ks, vs, idx, [0, T], 64, D**-0.5)
        o.backward(torch.zeros_like(o))
        triton_sparse_decode(qs[:2].detach(), ks.detach().view(1, T, Hk, D).expand(2, -1, -1, -1),
                             vs.detach().view(1, T, Hk, D).expand(2, -1, -1, -1), idx[:, :2].permute(1, 0, 2),
                             64, D**-0.5)
        # fused per-head RMSNorm + RoPE, forward and backward
        x = torch.zeros(1, 8, H, D, dtype=bf16, requires_grad=True)
        cos = sin = torch.zeros(1, 8, D)
        y = _NormRope.apply(x, torch.ones(D, requires_grad=True), cos, sin, 1e-6, bf16)
        y.backward(torch.zeros_like(y))
    return compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    args = parser.parse_args()
    compiled = compile_all(args.arch)
    print(f"sm_{args.arch}, Triton {triton.__version__}: {sum(map(len, compiled.values()))} kernels compiled")
    print(f"{'kernel':<28}{'registers':>10}{'spill B':>9}{'shared B':>10}")
    for name in sorted(compiled):
        for kernel in compiled[name]:
            info = _ptxas_info(kernel, args.arch)
            print(f"{name:<28}{info['registers']:>10}{info['spill_bytes']:>9}{info['shared_bytes']:>10}")


if __name__ == "__main__":
    main()
