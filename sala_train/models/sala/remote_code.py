"""The source files ``save_pretrained`` puts next to a SALA checkpoint's weights, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs it where only torch and
transformers are installed.

How transformers runs remote code (``transformers.dynamic_module_utils``): config.json's ``auto_map`` names
``modeling_minicpm_sala.MiniCPMSALAForCausalLM``. ``check_imports`` first requires every absolute import of
that file outside try/except blocks to be installed. ``get_relative_import_files`` then finds the files it
imports relatively, recursively, with a regex over the source (``from .x import``, try blocks included), and
all of them are copied into transformers' module cache as one flat package and imported from there. Hence:

- the two SALA files import sala_train only inside ``try`` and, in the ``except ImportError`` branch,
  ``from .x import`` the same names from the copies below;
- the copies are the unmodified sources of sala_train, flat, under the names those relative imports use
  (the teacher's modules import each other as ``.layers``, ``.attention``, ... already); the reference ops of
  the kernels become ``lightning_naive.py`` and ``sparse_naive.py``;
- ``pretrained.py`` is a stand-in: sala_train's streams checkpoints through ``sala_train.checkpoint``;
  without sala_train, transformers' own ``from_pretrained`` loads the weights.

``write_remote_code`` checks the written set with transformers' own functions, so that a checkpoint whose code
transformers would refuse (an import of a module that is not copied, or of a package other than torch and
transformers) fails when it is saved rather than when someone loads it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from sala_train.kernels.lightning import naive as lightning_naive
from sala_train.kernels.sparse import naive as sparse_naive

_SALA = Path(__file__).resolve().parent
_MODELS = _SALA.parent

# name in the checkpoint -> source file
REMOTE_CODE_FILES: dict[str, Path] = {
    "configuration_minicpm_sala.py": _SALA / "configuration_minicpm_sala.py",
    "modeling_minicpm_sala.py": _SALA / "modeling_minicpm_sala.py",
    "configuration_minicpm.py": _MODELS / "configuration_minicpm.py",
    "minicpm.py": _MODELS / "minicpm.py",
    "layers.py": _MODELS / "layers.py",
    "attention.py": _MODELS / "attention.py",
    "cache.py": _MODELS / "cache.py",
    "generation.py": _MODELS / "generation.py",
    "lightning_naive.py": Path(lightning_naive.__file__),
    "sparse_naive.py": Path(sparse_naive.__file__),
}

PRETRAINED_STANDIN = '''"""Stand-in for sala_train.models.pretrained in an exported checkpoint (written by
sala_train/models/sala/remote_code.py).

minicpm.py mixes CheckpointMixin into its models; sala_train's version streams checkpoints through
sala_train.checkpoint. Without sala_train, transformers' own PreTrainedModel.from_pretrained loads the
weights.
"""


class CheckpointMixin:
    pass
'''

# Packages the exported code may import at top level (besides the standard library).
ALLOWED_PACKAGES = {"torch", "transformers"}


def write_remote_code(directory: str | os.PathLike) -> None:
    """Copy the modeling files into a saved checkpoint directory and check them (see the module docstring)."""
    directory = Path(directory)
    for name, source in REMOTE_CODE_FILES.items():
        _write_atomic(directory / name, source.read_bytes())
    _write_atomic(directory / "pretrained.py", PRETRAINED_STANDIN.encode())
    problems = remote_code_problems(directory)
    if problems:
        raise RuntimeError(f"{directory}: the modeling files saved with the checkpoint would not load with "
                           "trust_remote_code=True:\n  " + "\n  ".join(problems)
                           + "\nUpdate REMOTE_CODE_FILES in sala_train/models/sala/remote_code.py.")


def remote_code_problems(directory: str | os.PathLike) -> list[str]:
    """What transformers would reject in the code of a checkpoint directory, as its own functions see it:
    relative imports of files that are not there, top-level imports of packages other than torch and
    transformers."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    directory = Path(directory)
    problems, seen = [], set()
    to_check = [directory / "modeling_minicpm_sala.py", directory / "configuration_minicpm_sala.py"]
    while to_check:  # the modeling files and, recursively, everything they import relatively
        file = to_check.pop()
        if file in seen:
            continue
        seen.add(file)
        if not file.is_file():
            problems.append(f"{file.name} is imported relatively but was not saved")
            continue
        for package in get_imports(file):
            if package not in ALLOWED_PACKAGES and package not in sys.stdlib_module_names:
                problems.append(f"{file.name} imports '{package}' outside a try block")
        to_check += [directory / f"{name}.py" for name in get_relative_imports(file)]
    return sorted(problems)


def _write_atomic(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; source files are for everyone to read
    os.replace(tmp.name, path)
