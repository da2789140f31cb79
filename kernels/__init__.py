"""sala_train.kernels: stateless ops (lightning attention, InfLLM-V2 sparse attention) with naive references."""

import os

import torch

# Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are imported): the kernels then run on CPU
# tensors, slowly; the CPU tests use it with tiny shapes.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can take ``x``: a CUDA tensor, or a CPU tensor under the interpreter."""
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")
