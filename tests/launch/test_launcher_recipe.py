"""recipes/launcher/slurm.yaml composes with the train recipe and takes the cluster settings from overrides."""

from hydra import compose, initialize_config_module

from sala_train.config import register_configs
from sala_train.testing import requires_module


@requires_module("hydra_plugins.hydra_submitit_launcher")
def test_slurm_launcher_takes_partition_nodes_gpus_time_and_account_from_overrides():
    register_configs()
    overrides = ["+launcher=slurm", "+experiment=tiny_launch", "student=s", "teacher=t",
                 "hydra.launcher.partition=gpu", "hydra.launcher.account=project", "hydra.launcher.nodes=2",
                 "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8",
                 "hydra.launcher.timeout_min=240"]
    with initialize_config_module(config_module="sala_train.recipes", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node,
            launcher.timeout_min) == ("gpu", "project", 2, 8, 8, 240)
    assert launcher.max_num_timeout == 3
    # each run of a sweep trains in its own folder under the sweep folder
    assert cfg._get_node("run_dir")._value() == "${hydra:sweep.dir}/${hydra:sweep.subdir}"
    assert cfg.hydra.sweep.dir.startswith("runs/multirun/")
