"""An exported SALA checkpoint loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` where sala_train is not installed, and
gives the in-package model's logits and generations."""

import os
import subprocess
import sys
import textwrap

import torch

from sala_train.models.sala.remote_code import REMOTE_CODE_FILES, remote_code_problems
from sala_train.testing import assert_close

from .test_sala import tiny_model

# Runs in a fresh interpreter: -I drops PYTHONPATH, the user site and the working directory from sys.path, and
# None in sys.modules makes every `import sala_train...` raise ImportError, as if it were not installed (the
# editable install's finder would otherwise still find it).
REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["sala_train"] = None
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint, inputs, outputs = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    loaded = [name for name, module in sys.modules.items() if module is not None]
    assert not any(name == "sala_train" or name.startswith("sala_train.") for name in loaded)
    ids = torch.load(inputs)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids[:, :40], max_new_tokens=20, eos_token_id=[])
    torch.save({"logits": logits, "generated": generated, "class": type(model).__name__}, outputs)
""")


def test_trust_remote_code_without_sala_train(tmp_path):
    # saved as "auto", which is "torch" without sala_train
    model = tiny_model(lightning_backend="auto", sparse_backend="auto")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=40_000)
    ids = torch.randint(0, 97, (2, 100))  # past dense_len: both sparse paths
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "remote.py"), str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["class"] == "MiniCPMSALAForCausalLM"

    # The same torch ops on both sides (in here the kernels would run in Triton's interpreter: slow, and
    # compared with the torch ops in test_sala.py); only thread counts differ, so rounding at most.
    model.set_backends(lightning="torch", sparse="torch")
    with torch.no_grad():
        assert_close(remote["logits"], model(ids).logits, ratio=1e-6, name="remote logits")
    assert torch.equal(remote["generated"], model.generate(ids[:, :40], max_new_tokens=20, eos_token_id=[]))


def test_exported_code_imports_only_torch_and_transformers(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    saved = {p.name for p in (tmp_path / "ckpt").glob("*.py")}
    assert saved == set(REMOTE_CODE_FILES) | {"pretrained.py"}
    for name, source in REMOTE_CODE_FILES.items():  # unmodified copies: one source of truth
        assert (tmp_path / "ckpt" / name).read_bytes() == source.read_bytes(), name
    assert remote_code_problems(tmp_path / "ckpt") == []

    # the check sees what transformers' check_imports would refuse
    modeling = tmp_path / "ckpt" / "modeling_minicpm_sala.py"
    modeling.write_text("import numpy\nfrom .missing_module import thing\n" + modeling.read_text())
    problems = remote_code_problems(tmp_path / "ckpt")
    assert "modeling_minicpm_sala.py imports 'numpy' outside a try block" in problems
    assert "missing_module.py is imported relatively but was not saved" in problems
