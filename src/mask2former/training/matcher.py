"""Hungarian matching of predicted (class, mask) pairs to ground-truth segments (DETR / Mask2Former)."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .losses import pairwise_dice_cost, pairwise_sigmoid_ce_cost, pairwise_sigmoid_focal_cost
from .point_sampling import point_sample, point_sample_shared

# Non-finite costs are replaced by this (the worst possible pair) and finite ones clamped to
# +-this, so that scipy never sees NaN/inf and the float64 solver keeps its precision.
COST_LIMIT = 1e10


def validate_targets(targets: list[dict], num_classes: int, batch_size: int) -> None:
    """Raise a one-line ValueError for a malformed target list (see ``data.contracts.CriterionTarget``)."""
    if len(targets) != batch_size:
        raise ValueError(f"targets: got {len(targets)} target dicts for a batch of {batch_size} predictions")
    for index, target in enumerate(targets):
        if "labels" not in target or "masks" not in target:
            raise ValueError(f"targets[{index}]: needs 'labels' and 'masks', got keys {sorted(target)}")
        labels, masks = target["labels"], target["masks"]
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(
                f"targets[{index}]['labels']: expected int64 [N], got {labels.dtype} {tuple(labels.shape)}"
            )
        if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{index}]['masks']: expected [N={labels.shape[0]},H,W], got {tuple(masks.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"targets[{index}]['labels']: class ids must be in [0, {num_classes}), got {labels.tolist()}"
            )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth segments, per image, minimising
    `mask_weight * mask_cost + class_weight * (-p[class]) + dice_weight * dice_cost`.

    mask_cost="points" (Mask2Former): BCE and dice on `num_points` uniform random points shared by
    all predictions and targets of an image. mask_cost="full" (MaskFormer): focal and dice on all
    pixels at the prediction resolution, targets nearest-downsampled to it.

    Costs whose value is NaN/inf are replaced by a large finite cost; each forward call that
    meets one increments `num_nonfinite_warnings` and emits one RuntimeWarning.
    """

    def __init__(
        self,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 12544,
        mask_cost: Literal["points", "full"] = "points",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if class_weight == 0 and mask_weight == 0 and dice_weight == 0:
            raise ValueError("HungarianMatcher: class_weight, mask_weight and dice_weight cannot all be 0")
        if mask_cost not in ("points", "full"):
            raise ValueError(f"HungarianMatcher: mask_cost must be 'points' or 'full', got {mask_cost!r}")
        if num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1, got {num_points}")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.mask_cost = mask_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_nonfinite_warnings = 0

    @torch.no_grad()
    def forward(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: list[dict],
        generator: torch.Generator | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Match `pred_logits[B,Q,K+1]` / `pred_masks[B,Q,h,w]` to `targets` (list of
        `{"labels": int64[N], "masks": [N,H,W]}` in the padded frame).

        Returns, per image, `(query_idx, target_idx)` CPU int64 tensors of length min(Q, N),
        sorted by query index; empty for images without targets.
        """
        batch_size, num_queries = pred_logits.shape[:2]
        validate_targets(targets, pred_logits.shape[-1] - 1, batch_size)
        indices = []
        bad_images = []
        for b, target in enumerate(targets):
            if target["labels"].numel() == 0:
                if self.mask_cost == "points":
                    # Draw (and drop) the image's points anyway: the random stream then stays aligned
                    # with the reference implementations, which sample before noticing there is no target.
                    torch.rand(1, self.num_points, 2, device=pred_masks.device, generator=generator)
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], target, generator).cpu()
            if not torch.isfinite(cost).all():
                bad_images.append(b)
                cost = torch.nan_to_num(cost, nan=COST_LIMIT, posinf=COST_LIMIT, neginf=COST_LIMIT)
            cost = cost.clamp(-COST_LIMIT, COST_LIMIT)
            query_idx, target_idx = linear_sum_assignment(cost.double().numpy())
            indices.append(
                (torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64))
            )
        if bad_images:
            self.num_nonfinite_warnings += 1
            warnings.warn(
                f"HungarianMatcher: non-finite matching costs in batch images {bad_images} replaced by {COST_LIMIT:g} "
                f"(occurrence {self.num_nonfinite_warnings}); predictions may have diverged",
                RuntimeWarning,
                stacklevel=2,
            )
        return indices

    def cost_matrix(
        self, logits: Tensor, masks: Tensor, target: dict, generator: torch.Generator | None = None
    ) -> Tensor:
        """`[Q, N]` matching cost of one image (`logits[Q,K+1]`, `masks[Q,h,w]`), in fp32 whatever the
        autocast state; may hold NaN/inf (forward sanitises it)."""
        labels = target["labels"].to(logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            cost_class = -logits.float().softmax(-1)[:, labels]
            target_masks = target["masks"].to(device=masks.device, dtype=torch.float32)
            pred_masks = masks.float()
            if self.mask_cost == "points":
                # One point set for all predictions and targets of the image: the pair costs compare like with like.
                coords = torch.rand(1, self.num_points, 2, device=masks.device, generator=generator)
                pred_points = point_sample_shared(pred_masks, coords[0])  # [Q, P]
                target_points = point_sample(target_masks[None], coords)[0]  # [N, P]
                cost_mask = pairwise_sigmoid_ce_cost(pred_points, target_points)
                cost_dice = pairwise_dice_cost(pred_points, target_points)
            else:
                target_small = F.interpolate(target_masks[:, None], size=pred_masks.shape[-2:], mode="nearest")[:, 0]
                pred_flat, target_flat = pred_masks.flatten(1), target_small.flatten(1)
                cost_mask = pairwise_sigmoid_focal_cost(pred_flat, target_flat, self.focal_alpha, self.focal_gamma)
                cost_dice = pairwise_dice_cost(pred_flat, target_flat)
            return self.mask_weight * cost_mask + self.class_weight * cost_class + self.dice_weight * cost_dice

    def extra_repr(self) -> str:
        return (
            f"class_weight={self.class_weight}, mask_weight={self.mask_weight}, dice_weight={self.dice_weight}, "
            f"num_points={self.num_points}, mask_cost={self.mask_cost!r}"
        )
