"""Test helpers shared by every sala-train test (needs pytest: ``pip install 'sala-train[test]'``).

- markers: ``requires_gpu``, ``requires_multi_gpu``, ``requires_module("deepspeed")``
- ``assert_close`` / ``error_ratio``: relative-error comparison against a reference implementation
- ``poison_empty``: NaN-fill uninitialised allocations so unwritten kernel outputs fail
- ``run_distributed``: run a function on N CPU processes with torch.distributed (gloo) initialised
- ``seed_everything``
- ``sala_train.testing.slurm.SlurmCluster`` (imported from there): a real SLURM cluster on this machine
"""

from sala_train.testing.compare import assert_close, error_ratio
from sala_train.testing.distributed import DistributedRunError, run_distributed
from sala_train.testing.markers import (
    MarkGroup,
    gpu_skip_reason,
    requires_gpu,
    requires_module,
    requires_multi_gpu,
)
from sala_train.testing.optional import install_hint, module_available, optional_import
from sala_train.testing.poison import poison_empty, poison_is_active
from sala_train.testing.seed import seed_everything

__all__ = [
    "DistributedRunError",
    "MarkGroup",
    "assert_close",
    "error_ratio",
    "gpu_skip_reason",
    "install_hint",
    "module_available",
    "optional_import",
    "poison_empty",
    "poison_is_active",
    "requires_gpu",
    "requires_module",
    "requires_multi_gpu",
    "run_distributed",
    "seed_everything",
]
