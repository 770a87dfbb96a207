"""The model a :class:`~mask2former.config.Config` describes, and the check that its backbone weights exist."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import Config
from .model import Mask2Former


def build_model(config: Config, label_space: Any = None) -> Mask2Former:
    """``Mask2Former(config.model)``; the class count comes from ``label_space`` when given."""
    model_config = config.model
    labels = None
    if label_space is not None:
        labels = label_space.to_dict()
        if model_config.num_classes != label_space.num_classes:
            model_config = dataclasses.replace(model_config, num_classes=label_space.num_classes)
    if config.mask_piloting.enabled and not model_config.mask_piloting:
        # MP-Former's piloting queries need their label embedding (a training-only parameter).
        model_config = dataclasses.replace(model_config, mask_piloting=True)
    # The reference's semantic post-processing order follows the tasks the model is trained for; saved with it.
    model_config = dataclasses.replace(
        model_config, semantic_postprocess_before_inference=config.test.semantic_before_inference()
    )
    return Mask2Former(model_config, labels=labels)


def check_backbone_weights(config: Config) -> None:
    """Refuse to train from a random backbone by accident: a config whose backbone is ``pretrained`` from a
    ``weights`` file (the reference presets) needs that file; ``model.backbone.pretrained=false`` trains without."""
    backbone = config.model.backbone
    if backbone.pretrained and backbone.weights:
        from ..interop.backbone_weights import require_weights

        require_weights(backbone.weights)


__all__ = ["build_model", "check_backbone_weights"]
