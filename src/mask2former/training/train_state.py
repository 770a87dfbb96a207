"""The trainer's resumable state: what a checkpoint holds, saving and loading it, and the random streams.

:class:`TrainStateMixin` is the part of ``Trainer`` (``trainer.py``) that reads and writes that state; the file
format and the RNG capture are in ``resume.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import to_dict
from . import distributed as dist_utils
from .resume import (
    CHECKPOINT_VERSION,
    capture_rng_state,
    check_checkpoint,
    find_last_checkpoint,
    load_training_checkpoint,
    process_rng_state,
    remove_stale_temporaries,
    restore_rng_state,
    save_training_checkpoint,
    seed_everything,
)
from .sampler import derive_seed

logger = logging.getLogger("mask2former.train")


class TrainStateMixin:
    """State handling of ``Trainer``: uses its ``config``, ``context``, ``model``, ``optimizer``, ``scheduler``,
    ``scaler``, ``point_generator``, ``label_space``, counters and ``callbacks``."""

    def state_dict(self) -> dict[str, Any]:
        """The full training state of this process (``save_checkpoint`` adds every process's RNG state)."""
        scheduler_state = self.scheduler.state_dict()
        # The schedule itself always comes from the config (None = keep the rebuilt one on load).
        scheduler_state["lr_lambdas"] = [None] * len(scheduler_state.get("lr_lambdas", []))
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": self._sampler.state_dict(self.samples_consumed) if self._sampler is not None else None,
            "best": self.best,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "config": to_dict(self.config),
            "labels": self.label_space.to_dict() if hasattr(self.label_space, "to_dict") else None,
        }

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint of the current step (rank 0 writes; every process contributes its RNG state)."""
        rng_states = dist_utils.all_gather_object(capture_rng_state(self.point_generator))
        path = None
        if self.is_main:
            state = self.state_dict()
            state["rng"] = rng_states
            path = save_training_checkpoint(state, self.output_dir, self.step, keep=self.keep_checkpoints)
            logger.info("step %d: saved %s", self.step, path)
            for callback in self.callbacks:
                callback.on_checkpoint(self, self.step, path)
        dist_utils.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state saved by :meth:`save_checkpoint` (call before training; model not yet DDP-wrapped)."""
        state = load_training_checkpoint(path)
        check_checkpoint(state, path, to_dict(self.config.model))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best = state.get("best")
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self._resume_data_state = state.get("data")
        self._pending_rng = process_rng_state(state, path, self.context.rank, self.context.world_size,
                                              self.config.train.seed)
        logger.info("resumed from %s at step %d", path, self.step)

    def _maybe_resume(self, resume: bool) -> None:
        self._resume_data_state = None
        self._pending_rng = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.output_dir)
        dist_utils.barrier()
        path = find_last_checkpoint(self.output_dir) if resume else None
        if resume and path is None and self.is_main:
            logger.info("resume: no checkpoint in %s, starting from scratch", self.output_dir)
        if path is not None:
            self.load_checkpoint(path)
        else:
            if not resume and self.is_main and find_last_checkpoint(self.output_dir) is not None:
                logger.warning("%s already holds checkpoints; starting from scratch (pass resume=True to continue)",
                               self.output_dir)
            self._pending_rng = derive_seed(self.config.train.seed, 4, self.context.rank)

    def _start_random_streams(self) -> None:
        """Seed (fresh run) or restore (resume) the RNGs; done last before the loop, so that whatever setup work
        draws random numbers (imports, the DDP probe) cannot shift the training streams."""
        pending = self._pending_rng
        if isinstance(pending, dict):
            restore_rng_state(pending, self.point_generator)
        else:
            seed_everything(pending)
            self.point_generator.manual_seed(derive_seed(pending, 1))
        self._pending_rng = None


__all__ = ["TrainStateMixin"]
