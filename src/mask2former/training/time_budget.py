"""``solver.time_budget_minutes``: size a run by what this machine does instead of by a fixed ``max_iter``.

The preset's ``max_iter`` is reproducible (same seed, same machine kind, same result) but its wall time is one
machine's. With a budget, the first ``PROBE_STEPS`` iterations are timed; then ``max_iter`` is set so that the whole
command (start-up, training, checkpoints and the evaluations, estimated) ends within the budget, the lr schedule is
rebuilt for it, and the choice is printed and written to the run's ``config.yaml``, so ``--resume`` continues the
same schedule. The probe iterations train with the preset's schedule (they are inside its warm-up), so a budgeted
run equals an unbudgeted one with the chosen ``max_iter`` only up to those first steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from ..config import save_config
from .callbacks import Callback
from .optim import build_schedule

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger("mask2former.train")

PROBE_STEPS = 20
# The first iterations are slower (kernel compilation, allocator warm-up): the clock starts after these.
UNTIMED_STEPS = 5
# Evaluating an image (fp32 forward, post-processing, metrics) costs about this fraction of training on it; measured
# on the default preset: 200 val images in 48 s against 1.8 s per iteration of 4 images (AVX2 EPYC, 2 threads).
EVAL_COST_PER_TRAIN_IMAGE = 0.55


def planned_iterations(budget_seconds: float, elapsed_seconds: float, steps_done: int, step_seconds: float,
                       eval_seconds: float, num_evaluations: int) -> int:
    """The ``max_iter`` whose remaining steps and evaluations end within ``budget_seconds`` (at least
    ``steps_done + 1``)."""
    left = budget_seconds - elapsed_seconds - eval_seconds * num_evaluations
    return max(steps_done + 1, steps_done + math.floor(left / step_seconds))


class TimeBudget(Callback):
    """Fixes ``solver.max_iter`` after :data:`PROBE_STEPS` timed iterations; ``started`` is when the command began
    (``time.perf_counter()``), so that building the data and the model count against the budget too."""

    def __init__(self, minutes: float, started: float, probe_steps: int = PROBE_STEPS) -> None:
        self.budget_seconds = minutes * 60.0
        self.minutes = minutes
        self.started = started
        self.probe_steps = probe_steps
        self.clock_start = 0.0
        self.decided = False

    def on_train_start(self, trainer: "Trainer") -> None:
        self.first_step = trainer.step
        self.clock_start = time.perf_counter()

    def on_step_end(self, trainer: "Trainer", step: int, logs: dict[str, Any] | None) -> None:
        untimed = min(UNTIMED_STEPS, self.probe_steps - 1)
        if step - self.first_step == untimed:
            self.clock_start = time.perf_counter()
        if self.decided or step - self.first_step < self.probe_steps:
            return
        self.decided = True
        now = time.perf_counter()
        step_seconds = (now - self.clock_start) / (step - self.first_step - untimed)
        config = trainer.config
        val_images = len(trainer.val_dataset) if trainer.val_dataset is not None else 0
        eval_seconds = EVAL_COST_PER_TRAIN_IMAGE * step_seconds / config.solver.batch_size * val_images
        period = config.train.eval_period
        first_guess = planned_iterations(self.budget_seconds, now - self.started, step, step_seconds, eval_seconds, 1)
        evaluations = 1 + (first_guess // period if period > 0 else 0)
        max_iter = planned_iterations(self.budget_seconds, now - self.started, step, step_seconds, eval_seconds,
                                      evaluations if val_images else 0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank the same
            chosen = torch.tensor([max_iter], device=trainer.device)
            torch.distributed.broadcast(chosen, src=0)
            max_iter = int(chosen.item())
        solver = dataclasses.replace(config.solver, max_iter=max_iter)
        trainer.config = dataclasses.replace(config, solver=solver)
        schedule = build_schedule(solver)
        trainer.scheduler.lr_lambdas = [schedule] * len(trainer.scheduler.lr_lambdas)
        progress = trainer.log.progress
        if progress is not None:
            progress.total = max_iter
            progress.refresh()
        if trainer.is_main:
            save_config(trainer.config, trainer.output_dir / "config.yaml")
            logger.info("time budget %g min: %.2f s per iteration over %d iterations, evaluation ~%.0f s x %d, "
                        "%.0f s spent -> max_iter %d (preset %d)", self.minutes, step_seconds, step - self.first_step,
                        eval_seconds, evaluations if val_images else 0, now - self.started, max_iter,
                        config.solver.max_iter)
