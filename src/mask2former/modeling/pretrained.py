"""``Mask2Former.from_pretrained``: the model a checkpoint describes, with its weights (any format that
``interop.checkpoint.read_checkpoint`` reads)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..interop.checkpoint import load_state_dict_checked, read_checkpoint
from .backbone import skip_imagenet_weights


def load_pretrained(cls, path: str | Path, config: str | None = None, num_classes: int | None = None,
                    map_location: str = "cpu"):
    """``cls(model config, labels)`` from the checkpoint at ``path``, its weights loaded (strictly, except a class
    head of another size: ``num_classes`` builds another head, which keeps its random initialisation)."""
    model_config, state, labels, source = read_checkpoint(path, config)
    if num_classes is not None and num_classes != model_config.num_classes:
        model_config = dataclasses.replace(model_config, num_classes=num_classes)
        labels = None
    with skip_imagenet_weights():  # the checkpoint replaces them: no ImageNet weights file needed
        model = cls(model_config, labels=labels)
    load_state_dict_checked(model, state, source)
    return model.to(map_location)


__all__ = ["load_pretrained"]
