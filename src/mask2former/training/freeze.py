"""``train.freeze``: parts of the model that keep their weights during training (fine-tuning from a whole model).

A frozen part's parameters get ``requires_grad = False`` (no gradient, hence not in the optimiser, which takes only
trainable parameters) and the part runs in eval mode even while the model trains: batch-norm running statistics are
not updated and dropout is off, as detectron2 treats frozen stages. Eval mode is re-imposed by a forward pre-hook,
so ``model.train()`` (the trainer calls it after every evaluation) cannot undo it.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from ..config import FREEZABLE_PARTS


def _keep_eval(module: nn.Module, _inputs: object) -> None:
    if module.training:
        module.eval()


def freeze_parts(model: nn.Module, parts: Iterable[str]) -> list[str]:
    """Freeze the named submodules of ``model`` (any of ``FREEZABLE_PARTS``); returns one log line per part."""
    lines = []
    for part in parts:
        if part not in FREEZABLE_PARTS:
            raise ValueError(f"train.freeze: unknown part {part!r} (choose from {', '.join(FREEZABLE_PARTS)})")
        module = getattr(model, part, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"train.freeze: the model has no {part}")
        count = 0
        for parameter in module.parameters():
            parameter.requires_grad_(False)
            count += parameter.numel()
        module.eval()
        if not getattr(module, "_mask2former_frozen", False):
            module.register_forward_pre_hook(_keep_eval)
            module._mask2former_frozen = True
        lines.append(f"train.freeze: {part} frozen ({count:,} parameters, eval mode)")
    return lines


__all__ = ["freeze_parts"]
