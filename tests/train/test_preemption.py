"""Preemption: SIGUSR1 / SIGTERM mid-stage makes the trainer checkpoint after the current step and exit with
code 75; the same command then resumes from that checkpoint with the losses of an uninterrupted run."""

import json
import os
import signal
from pathlib import Path

import pytest

from sala_train.testing import run_distributed
from sala_train.testing.training import make_tiny_checkpoints, read_losses, tiny_train_config
from sala_train.train.preemption import MARKER_NAME, PREEMPTED_EXIT_CODE, Preempted, watch_preemption
from sala_train.train.trainer import Trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


def make_config(checkpoints, run_dir):
    cfg = tiny_train_config(checkpoints, run_dir)
    for stage in cfg.stages:
        stage.save_every = 0  # no periodic checkpoints: the mid-stage one can only come from the preemption
    return cfg


def signal_at(global_step: int, signum: int, rank_to_signal: int = 0):
    """A Trainer._log that sends ``signum`` to this process once ``global_step`` is logged (on one rank)."""
    original = Trainer._log

    def log_then_signal(self, record):
        original(self, record)
        if record.get("global_step") == global_step and "loss" in record and self.rank == rank_to_signal:
            os.kill(os.getpid(), signum)
    return log_then_signal


@pytest.fixture(scope="module")
def uninterrupted_losses(checkpoints, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    Trainer(make_config(checkpoints, run_dir)).run()
    return read_losses(run_dir)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_mid_stage_checkpoints_exits_75_and_resumes_exactly(checkpoints, uninterrupted_losses, tmp_path,
                                                                    monkeypatch, signum):
    expected = uninterrupted_losses

    handler_before = signal.getsignal(signum)
    run_dir = tmp_path / "preempted"
    monkeypatch.setattr(Trainer, "_log", signal_at(3, signum))  # stage 1 ("long"), after its step 1 of 2
    with pytest.raises(Preempted) as stopped:
        Trainer(make_config(checkpoints, run_dir)).run()
    monkeypatch.undo()
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert signal.getsignal(signum) == handler_before  # handlers restored when run() ends
    marker = json.loads((run_dir / MARKER_NAME).read_text())
    assert marker["signal"] == signal.Signals(signum).name
    assert (marker["stage_index"], marker["step"], marker["global_step"]) == (1, 1, 3)
    assert (run_dir / "checkpoints" / "stage-01-step-00000001" / "optimizer.pt").exists()
    assert max(read_losses(run_dir)) == 3  # nothing after the preempted step ran

    Trainer(make_config(checkpoints, run_dir)).run()  # the same command: resumes, no manual step
    assert not (run_dir / MARKER_NAME).exists()
    resumed = read_losses(run_dir)
    assert resumed.keys() == expected.keys()
    for step in expected:  # fp32 on CPU, same batches, weights, optimizer state and RNG: identical
        assert resumed[step] == expected[step], step


def _preempt_rank(rank, world, checkpoints, run_dir):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(Trainer, "_log", signal_at(2, signal.SIGTERM, rank_to_signal=1))
        try:
            Trainer(make_config(Path(checkpoints), Path(run_dir))).run()
        except Preempted as stopped:
            return stopped.code
    return "finished"


def test_one_signalled_rank_stops_every_rank_after_the_same_step(checkpoints, tmp_path):
    # only rank 1 gets SIGTERM; rank 0 logs the metrics, so the hook signals rank 1 as rank 1 reaches step 2
    run_dir = tmp_path / "two"
    assert run_distributed(_preempt_rank, 2, args=(str(checkpoints), str(run_dir)), timeout_s=300) == [75, 75]
    marker = json.loads((run_dir / MARKER_NAME).read_text())  # written by rank 0, which was not signalled
    assert marker["signal"] == "a signal or the time limit on another rank"
    assert (marker["stage_index"], marker["step"]) == (0, 2)  # the last step of stage 0: resume goes on from there


def test_a_signal_before_the_run_is_remembered_and_stops_it_after_the_first_step(checkpoints, tmp_path):
    # python -m sala_train.train watches from its first line, so a signal while the model loads is not lost
    with watch_preemption() as outer:
        os.kill(os.getpid(), signal.SIGUSR1)
        with watch_preemption() as inner:
            assert inner is outer
        with pytest.raises(Preempted):
            Trainer(make_config(checkpoints, tmp_path / "early")).run()
    marker = json.loads((tmp_path / "early" / MARKER_NAME).read_text())
    assert (marker["signal"], marker["global_step"]) == ("SIGUSR1", 1)


def test_time_limit_stops_after_a_step_and_repeated_runs_match_an_uninterrupted_one(checkpoints,
                                                                                     uninterrupted_losses, tmp_path):
    # a limit already past when the first step ends: every run does one step, checkpoints, exits with 75
    run_dir = tmp_path / "limited"
    runs = 0
    while True:
        cfg = make_config(checkpoints, run_dir)
        cfg.time_limit_minutes = 1e-9
        runs += 1
        try:
            Trainer(cfg).run()
            break
        except Preempted as stopped:
            assert stopped.code == PREEMPTED_EXIT_CODE
            marker = json.loads((run_dir / MARKER_NAME).read_text())
            assert marker["signal"].startswith("the time limit") and marker["global_step"] == runs
        assert runs <= len(uninterrupted_losses) + 1
    assert runs == len(uninterrupted_losses) + 1  # one step per run, then one run that only finishes the stage
    assert read_losses(run_dir) == uninterrupted_losses


def test_time_limit_must_be_positive(checkpoints, tmp_path):
    from sala_train.train.config import RecipeError

    cfg = make_config(checkpoints, tmp_path / "bad")
    cfg.time_limit_minutes = 0
    with pytest.raises(RecipeError, match="time_limit_minutes = 0"):
        Trainer(cfg)
