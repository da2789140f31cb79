"""Learning-rate schedules: pure functions of the optimizer step, so that a resumed run gets the same LR.

Every schedule of SPEC 6 is one shape, ``WarmupStableDecay``:

    warmup   steps [0, W)            lr = peak_lr * (step + 1) / W             (linear ramp from ~0)
    stable   steps [W, W + S)        lr = peak_lr
    decay    steps [W + S, W + S + D) lr = curve(peak_lr -> final_lr, progress (step - W - S) / D)
    after    steps >= W + S + D      lr = final_lr

with the curve linear, exponential (``peak * (final/peak) ** progress``) or cosine. The named schedules only
choose W, S, D and the curve:

    constant     warmup then constant                  (stage 2: warmup 2000 steps, 7.5e-3)
    exponential  warmup then exponential decay to the end  (stage 3: 7.5e-3 -> 3.75e-4)
    cosine       warmup then cosine to a floor         (HALO conversion: 1e-3 cosine)
    wsd          warmup, stable, then the last ``decay_fraction`` of the steps decay (MiniCPM's WSD)

``step`` counts the optimizer updates already taken: ``lr_at(0)`` is the LR of the first update. A decay that
ends at ``total_steps`` reaches ``final_lr`` at step ``total_steps``, the first step after the stage, so a next
stage that starts at that LR continues the curve without a jump (stage 4a -> 4b -> 4c).

LRs here are muP base rates (SPEC 6); each optimizer group multiplies them by its ``lr_scale``
(see ``sala_train.train.params.param_groups``). Two ways to drive an optimizer:

    set_learning_rate(optimizer, schedule.lr_at(step))      # explicit, before each optimizer.step()
    scheduler = lambda_lr(optimizer, schedule)              # torch LambdaLR over schedule.multiplier
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULE_KINDS = ("constant", "exponential", "cosine", "wsd")
DECAY_SHAPES = ("linear", "exponential", "cosine")


class ScheduleError(ValueError):
    """A schedule that cannot be built from the values given; the message names the value."""


def decay_curve(shape: str, start: float, end: float, progress: float) -> float:
    """The LR ``progress`` (0 to 1) of the way from ``start`` to ``end`` along ``shape``."""
    if shape == "linear":
        return start + (end - start) * progress
    if shape == "exponential":  # a straight line in log(lr)
        return start * (end / start) ** progress
    if shape == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ScheduleError(f"decay shape {shape!r} is unknown; expected one of {list(DECAY_SHAPES)}")


@dataclass(frozen=True)
class WarmupStableDecay:
    """Warmup for ``warmup_steps``, ``peak_lr`` for ``stable_steps``, then ``decay_shape`` down to ``final_lr``
    over ``decay_steps``; ``final_lr`` from then on. Zero-length phases are skipped."""

    peak_lr: float
    final_lr: float
    warmup_steps: int = 0
    stable_steps: int = 0
    decay_steps: int = 0
    decay_shape: str = "linear"

    def __post_init__(self):
        for key in ("warmup_steps", "stable_steps", "decay_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ScheduleError(f"{key} = {value!r}: expected an integer >= 0")
        if not self.peak_lr > 0:
            raise ScheduleError(f"peak lr = {self.peak_lr!r}: expected a positive learning rate")
        if self.decay_shape not in DECAY_SHAPES:
            raise ScheduleError(f"decay_shape = {self.decay_shape!r}: expected one of {list(DECAY_SHAPES)}")
        if self.decay_steps:
            if self.final_lr > self.peak_lr:
                raise ScheduleError(f"final lr {self.final_lr!r} is above the peak lr {self.peak_lr!r}: a decay "
                                    "must go down (for a constant LR use kind 'constant')")
            if self.decay_shape == "exponential" and not self.final_lr > 0:
                raise ScheduleError(f"final lr = {self.final_lr!r}: an exponential decay needs a positive final "
                                    "lr (use a linear or cosine decay to reach 0)")
            if self.final_lr < 0:
                raise ScheduleError(f"final lr = {self.final_lr!r}: expected >= 0")

    @property
    def total_steps(self) -> int:
        """Steps until the LR reaches ``final_lr``."""
        return self.warmup_steps + self.stable_steps + self.decay_steps

    def lr_at(self, step: int) -> float:
        """The LR of update number ``step`` (0-based)."""
        if step < 0:
            raise ScheduleError(f"step = {step}: steps count from 0")
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_start = self.warmup_steps + self.stable_steps
        if step < decay_start or not self.decay_steps:
            return self.peak_lr
        progress = min(1.0, (step - decay_start) / self.decay_steps)
        return decay_curve(self.decay_shape, self.peak_lr, self.final_lr, progress)

    def multiplier(self, step: int) -> float:
        """``lr_at(step) / peak_lr``: the factor on the peak LR (what torch's LambdaLR expects)."""
        return self.lr_at(step) / self.peak_lr


# -- the named schedules ---------------------------------------------------------------------------------

def constant(lr: float, warmup_steps: int = 0) -> WarmupStableDecay:
    """Linear warmup over ``warmup_steps``, then ``lr`` for ever."""
    return WarmupStableDecay(lr, lr, warmup_steps=warmup_steps)


def exponential_decay(lr: float, final_lr: float, total_steps: int, warmup_steps: int = 0) -> WarmupStableDecay:
    """Warmup, then ``lr * (final_lr / lr) ** progress`` over the remaining steps of ``total_steps``."""
    return WarmupStableDecay(lr, final_lr, warmup_steps, 0, _steps_after_warmup(total_steps, warmup_steps),
                             "exponential")


def cosine_decay(lr: float, final_lr: float, total_steps: int, warmup_steps: int = 0) -> WarmupStableDecay:
    """Warmup, then half a cosine from ``lr`` down to the floor ``final_lr`` over the remaining steps."""
    return WarmupStableDecay(lr, final_lr, warmup_steps, 0, _steps_after_warmup(total_steps, warmup_steps), "cosine")


def wsd(lr: float, final_lr: float, total_steps: int, decay_fraction: float, decay_shape: str = "exponential",
        warmup_steps: int = 0) -> WarmupStableDecay:
    """Warmup-stable-decay: the last ``round(decay_fraction * total_steps)`` steps decay to ``final_lr``."""
    if not 0.0 <= decay_fraction <= 1.0:
        raise ScheduleError(f"decay_fraction = {decay_fraction!r}: expected a fraction of total_steps in [0, 1]")
    after_warmup = _steps_after_warmup(total_steps, warmup_steps)
    decay_steps = round(decay_fraction * total_steps)
    if decay_steps > after_warmup:
        raise ScheduleError(f"decay_fraction = {decay_fraction} of total_steps = {total_steps} is {decay_steps} "
                            f"decay steps, more than the {after_warmup} steps left after warmup_steps = "
                            f"{warmup_steps}")
    return WarmupStableDecay(lr, final_lr, warmup_steps, after_warmup - decay_steps, decay_steps, decay_shape)


def _steps_after_warmup(total_steps: int, warmup_steps: int) -> int:
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0:
        raise ScheduleError(f"total_steps = {total_steps!r}: a decaying schedule needs a positive number of steps")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ScheduleError(f"warmup_steps = {warmup_steps!r}: expected an integer >= 0")
    if warmup_steps > total_steps:
        raise ScheduleError(f"warmup_steps = {warmup_steps} is longer than total_steps = {total_steps}")
    return total_steps - warmup_steps


# -- from a config ----------------------------------------------------------------------------------------

@dataclass
class ScheduleConfig:
    """One stage's LR schedule (the ``optim`` part of a stage recipe).

    kind            constant | exponential | cosine | wsd
    lr              peak (muP base) learning rate
    final_lr        where a decay ends (exponential, cosine, wsd); unused by constant
    warmup_steps    linear warmup at the start
    total_steps     optimizer steps of the stage (decays end here); unused by constant
    decay_fraction  wsd: share of total_steps spent decaying
    decay_shape     wsd: linear | exponential | cosine (MiniCPM's WSD decays exponentially)
    """

    kind: str = "constant"
    lr: float = 1e-3
    final_lr: float | None = None
    warmup_steps: int = 0
    total_steps: int | None = None
    decay_fraction: float = 0.1
    decay_shape: str = "exponential"


def build_schedule(config: ScheduleConfig) -> WarmupStableDecay:
    """The schedule a ``ScheduleConfig`` describes; a ScheduleError names the impossible value."""
    if config.kind not in SCHEDULE_KINDS:
        raise ScheduleError(f"schedule kind = {config.kind!r} is unknown; expected one of {list(SCHEDULE_KINDS)}")
    if config.kind == "constant":
        if config.total_steps is not None and config.warmup_steps > config.total_steps:
            raise ScheduleError(f"warmup_steps = {config.warmup_steps} is longer than total_steps = "
                                f"{config.total_steps}")
        return constant(config.lr, config.warmup_steps)
    if config.final_lr is None:
        raise ScheduleError(f"schedule kind {config.kind!r} decays: set final_lr (the LR at total_steps)")
    if config.total_steps is None:
        raise ScheduleError(f"schedule kind {config.kind!r} decays: set total_steps (optimizer steps of the stage)")
    if config.kind == "exponential":
        return exponential_decay(config.lr, config.final_lr, config.total_steps, config.warmup_steps)
    if config.kind == "cosine":
        return cosine_decay(config.lr, config.final_lr, config.total_steps, config.warmup_steps)
    return wsd(config.lr, config.final_lr, config.total_steps, config.decay_fraction, config.decay_shape,
               config.warmup_steps)


# -- driving an optimizer ---------------------------------------------------------------------------------

def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to ``lr * group["lr_scale"]`` (scale 1 for groups without one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lambda_lr(optimizer: torch.optim.Optimizer, schedule: WarmupStableDecay) -> torch.optim.lr_scheduler.LambdaLR:
    """A torch LambdaLR that follows ``schedule``. The groups' LRs must be ``schedule.peak_lr * lr_scale`` when
    it is created (LambdaLR multiplies each group's initial LR). To resume, load its ``state_dict`` (the step),
    or skip it and call ``set_learning_rate(optimizer, schedule.lr_at(step))``."""
    for group in optimizer.param_groups:
        expected = schedule.peak_lr * group.get("lr_scale", 1.0)
        lr = group["lr"]
        if not math.isclose(lr, expected, rel_tol=1e-9):
            raise ScheduleError(f"optimizer group {group.get('name', '?')!r} has lr {lr!r}, expected peak_lr * "
                                f"lr_scale = {expected!r}: build the groups with lr = schedule.peak_lr")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.multiplier)
