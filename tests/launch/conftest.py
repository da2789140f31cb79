"""One real SLURM cluster of 2 nodes (2 slurmds on this machine) per test session (sala_train.testing.slurm),
shared by the SLURM tests; skipped with the reason when it cannot run here (not root, no apt-get)."""

import pytest

from sala_train.testing.slurm import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"), nodes=2)  # 2 slurmds: multi-node jobs
    except SlurmUnavailable as error:
        pytest.skip(f"no SLURM cluster on this machine: {error}")
    yield cluster
    cluster.stop()
