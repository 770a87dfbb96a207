"""Hooks into ``Trainer.fit``, Lightning-style."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """Hooks, Lightning-style; override what you need. ``logs`` are the values written to ``metrics.jsonl``."""

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", step: int, logs: dict[str, Any] | None) -> None: ...

    def on_evaluate(self, trainer: "Trainer", step: int, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", step: int, path: Path) -> None: ...

    def on_train_end(self, trainer: "Trainer", result: dict[str, Any]) -> None: ...


__all__ = ["Callback"]
