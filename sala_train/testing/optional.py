"""Availability checks for the optional stacks (DeepSpeed, Megatron-core, fla, W&B, Triton).

Each optional stack is imported lazily where it is used; when it is missing, the error says which
extra of sala-train installs it. This module imports only the standard library, so it costs nothing
to import. (It sits in ``sala_train.testing`` for now because tests are its first user; library code
that needs ``optional_import`` without pulling in pytest should move it to a top-level module.)
"""

import importlib
import importlib.util
from types import ModuleType

# Import name (its top-level package) -> the extra in setup.cfg that installs it.
_EXTRA_FOR_PACKAGE = {
    "deepspeed": "deepspeed",
    "megatron": "megatron",
    "fla": "fla",
    "wandb": "wandb",
    "triton": "triton",
    "submitit": "slurm",
    "hydra_plugins": "slurm",  # hydra_plugins.hydra_submitit_launcher
}


def install_hint(module_name: str) -> str:
    """The pip command that installs ``module_name``, e.g. ``pip install 'sala-train[deepspeed]'``."""
    package = module_name.split(".")[0]
    extra = _EXTRA_FOR_PACKAGE.get(package)
    if extra is not None:
        return f"pip install 'sala-train[{extra}]'"
    return f"pip install {package}"


def module_available(module_name: str) -> bool:
    """True when ``module_name`` can be found, without importing it (a parent package may be imported)."""
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):  # parent package missing, or a module with no spec
        return False


def optional_import(module_name: str) -> ModuleType:
    """Import an optional dependency, or fail with a message that says what to install.

    Only a missing ``module_name`` (or one of its parent packages) gets the install hint; an installed
    package that fails on one of its own imports raises its original error.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ModuleNotFoundError(
                f"{module_name} is not installed; install it with: {install_hint(module_name)}",
                name=module_name,
            ) from error
        raise
