"""Which evaluation was the best so far, and ``model_best/`` for it."""

from __future__ import annotations

import logging
from typing import Any, Callable

from .metrics_log import flatten_numbers

logger = logging.getLogger("mask2former.train")

DEFAULT_BEST_METRIC = {"panoptic": "PQ", "semantic": "mIoU", "instance": "AP"}


def lookup_metric(metrics: dict[str, Any], name: str) -> float | None:
    """``metrics[name]``, also through nested dicts (``"panoptic/PQ"`` or a bare ``"PQ"`` found one level down)."""
    if name in metrics and isinstance(metrics[name], (int, float)):
        return float(metrics[name])
    node: Any = metrics
    for part in name.replace(".", "/").split("/"):
        if not isinstance(node, dict) or part not in node:
            node = None
            break
        node = node[part]
    if isinstance(node, (int, float)):
        return float(node)
    for value in metrics.values():
        if isinstance(value, dict):
            found = lookup_metric(value, name)
            if found is not None:
                return found
    return None


class BestModelTracker:
    """Tracks ``metric`` (``mode`` "max" or "min") over evaluations; ``best`` is ``{"metric", "value", "step",
    "mode"}`` of the best one (saved in checkpoints), None before the first."""

    def __init__(self, metric: str, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"Trainer: best_mode must be 'max' or 'min', got {mode!r}")
        self.metric = metric
        self.mode = mode
        self.best: dict[str, Any] | None = None
        self._warned = False

    def update(self, metrics: dict[str, Any], step: int, save: Callable[[dict[str, Any]], None]) -> bool:
        """Record ``metrics`` of ``step``; when they are the best so far, call ``save(best)`` and return True."""
        value = lookup_metric(metrics, self.metric)
        if value is None:
            if not self._warned:
                logger.warning("best checkpoint: metric %r not among the evaluation results %s", self.metric,
                               sorted(flatten_numbers(metrics))[:12])
                self._warned = True
            return False
        better = self.best is None or (value > self.best["value"] if self.mode == "max" else value < self.best["value"])
        if better:
            self.best = {"metric": self.metric, "value": value, "step": step, "mode": self.mode}
            save(self.best)
        return better


__all__ = ["BestModelTracker", "DEFAULT_BEST_METRIC", "lookup_metric"]
