"""The loss a :class:`~mask2former.config.Config` describes: ``SetCriterion`` with its matcher, or MP-Former's."""

from __future__ import annotations

from torch import nn

from ..config import Config
from .criterion import SetCriterion
from .matcher import HungarianMatcher


def build_criterion(config: Config, num_classes: int) -> nn.Module:
    """``SetCriterion`` with the matcher the reference pairs with it (cost weights = loss weights); wrapped in
    MP-Former's ``MaskPilotingCriterion`` when ``mask_piloting.enabled``."""
    loss = config.loss
    matcher = HungarianMatcher(class_weight=loss.class_weight, mask_weight=loss.mask_weight,
                               dice_weight=loss.dice_weight, num_points=loss.num_points, mask_cost=loss.mask_loss)
    criterion = SetCriterion(
        num_classes, matcher, class_weight=loss.class_weight, mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight, no_object_weight=loss.no_object_weight, num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio, importance_sample_ratio=loss.importance_sample_ratio,
        deep_supervision=loss.deep_supervision, mask_loss=loss.mask_loss,
    )
    if config.mask_piloting.enabled:
        from .mask_piloting import MaskPilotingCriterion

        return MaskPilotingCriterion(criterion, class_loss=config.mask_piloting.class_loss)
    return criterion


__all__ = ["build_criterion"]
