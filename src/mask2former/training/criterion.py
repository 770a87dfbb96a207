"""Set-prediction loss of Mask2Former (and MaskFormer's full-resolution variant).

Per prediction set (final + each aux): Hungarian matching, then
`class_weight * CE(K+1 classes, no-object weighted) + mask_weight * BCE + dice_weight * dice`
on the matched pairs. The core, `loss_for_assignment`, takes any assignment so that
MP-Former's direct (matching-free) assignment reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import dice_loss, sigmoid_ce_loss, sigmoid_focal_loss
from .matcher import HungarianMatcher, validate_targets
from .point_sampling import point_sample, point_sample_matched, uncertain_point_coords

Indices = list[tuple[Tensor, Tensor]]


@dataclass
class MatchedTargets:
    """The matched target masks, named rather than gathered: row k is ``masks[i][indices[i][k']]`` in image order."""

    masks: list[Tensor]  # per image, float [N, H, W]
    indices: list[Tensor]  # per image, the matched target indices in pair order


def compute_num_masks(targets: list[dict], device: torch.device) -> float:
    """Average number of GT masks per process: local count, summed over processes and divided by
    the world size when torch.distributed is initialised, clamped to >= 1."""
    num_masks = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_masks)
        num_masks = num_masks / dist.get_world_size()
    return max(float(num_masks.item()), 1.0)


def prepare_targets(targets: list[dict], num_classes: int, batch_size: int, device: torch.device) -> list[dict]:
    """Validate targets and give each one float32 masks on `device`, zero-padded bottom/right to
    the largest frame in the batch (padding, like ignore pixels, counts as background)."""
    validate_targets(targets, num_classes, batch_size)
    height = max(t["masks"].shape[-2] for t in targets)
    width = max(t["masks"].shape[-1] for t in targets)
    prepared = []
    for target in targets:
        masks = target["masks"].to(device=device, dtype=torch.float32)
        pad_bottom, pad_right = height - masks.shape[-2], width - masks.shape[-1]
        if pad_bottom or pad_right:
            masks = F.pad(masks, (0, pad_right, 0, pad_bottom))
        prepared.append({"labels": target["labels"].to(device), "masks": masks})
    return prepared


def _flat_indices(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(batch index, query index, target index) of every matched pair, image by image."""
    batch_idx = torch.cat([torch.full_like(query, b) for b, (query, _) in enumerate(indices)]).to(device)
    query_idx = torch.cat([query for query, _ in indices]).to(device)
    target_idx = torch.cat([target for _, target in indices]).to(device)
    return batch_idx, query_idx, target_idx


class SetCriterion(nn.Module):
    """Mask2Former loss over the final prediction and (with deep supervision) every aux prediction.

    `forward` returns weighted terms `loss_ce, loss_mask, loss_dice` (final) and `loss_ce_i, ...`
    (aux i, decoder order); `SetCriterion.total_loss(losses)` sums them.

    mask_loss="points" (Mask2Former): BCE + dice on `num_points` uncertainty-sampled points per matched
    mask, in fp32 even under autocast. mask_loss="full" (MaskFormer): sigmoid focal + dice on every
    pixel of the prediction bilinearly upsampled to the target frame (use weights class 1, mask 20,
    dice 1 and a matcher with mask_cost="full" for the MaskFormer recipe).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        mask_loss: Literal["points", "full"] = "points",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if mask_loss not in ("points", "full"):
            raise ValueError(f"SetCriterion: mask_loss must be 'points' or 'full', got {mask_loss!r}")
        if getattr(matcher, "mask_cost", mask_loss) != mask_loss:
            raise ValueError(
                f"SetCriterion: mask_loss={mask_loss!r} needs a matcher with mask_cost={mask_loss!r}, "
                f"got {matcher.mask_cost!r}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.mask_loss = mask_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        # Not persistent: the criterion's constants do not belong in model checkpoints.
        self.register_buffer("empty_weight", class_weights, persistent=False)

    @staticmethod
    def total_loss(losses: dict[str, Tensor]) -> Tensor:
        """Sum of the (already weighted) loss terms."""
        return sum(losses.values())

    def forward(
        self,
        outputs: dict[str, Any] | Any,
        targets: list[dict],
        return_indices: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Indices]]:
        """Weighted loss terms for `outputs` (`{"pred_logits", "pred_masks", "aux_outputs"}` or an object
        with `as_dict()`) against `targets` (`[{"labels": int64[N], "masks": [N,H,W]}]`, crowd removed).

        With `return_indices=True` also returns the matching of every prediction set in decoder
        order: `indices[i]` for aux i, `indices[-1]` for the final prediction.
        """
        if not isinstance(outputs, dict):
            outputs = outputs.as_dict()
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        aux_outputs = (outputs.get("aux_outputs") or []) if self.deep_supervision else []
        targets = prepare_targets(targets, self.num_classes, pred_logits.shape[0], pred_logits.device)
        num_masks = compute_num_masks(targets, pred_logits.device)

        # Final prediction first, then aux in decoder order (the order of the random draws).
        indices = self.matcher(pred_logits, pred_masks, targets, generator=generator)
        losses = self._loss_for_assignment(pred_logits, pred_masks, targets, indices, num_masks, generator)
        all_indices = []
        for i, aux in enumerate(aux_outputs):
            aux_indices = self.matcher(aux["pred_logits"], aux["pred_masks"], targets, generator=generator)
            aux_losses = self._loss_for_assignment(
                aux["pred_logits"], aux["pred_masks"], targets, aux_indices, num_masks, generator
            )
            losses.update({f"{key}_{i}": value for key, value in aux_losses.items()})
            all_indices.append(aux_indices)
        all_indices.append(indices)
        return (losses, all_indices) if return_indices else losses

    def loss_for_assignment(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: list[dict],
        indices: Indices,
        num_masks: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Weighted `loss_ce`, `loss_mask`, `loss_dice` of one prediction set for a given assignment
        (per image `(query_idx, target_idx)`); unassigned queries are trained towards no-object."""
        targets = prepare_targets(targets, self.num_classes, pred_logits.shape[0], pred_logits.device)
        return self._loss_for_assignment(pred_logits, pred_masks, targets, indices, num_masks, generator)

    def _loss_for_assignment(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: list[dict],
        indices: Indices,
        num_masks: float,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        batch_idx, query_idx, target_idx = _flat_indices(indices, pred_logits.device)
        loss_ce = self.class_loss(pred_logits, targets, indices, batch_idx, query_idx)
        matched_masks = pred_masks[batch_idx, query_idx]  # [M, h, w]
        if self.mask_loss == "points":  # targets are only read at the sampled points: no full-resolution gather
            target_masks: Tensor | MatchedTargets = MatchedTargets([t["masks"] for t in targets],
                                                                   [j for _, j in indices])
        else:
            target_masks = torch.cat([t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)])
        loss_mask, loss_dice = self.mask_losses(matched_masks, target_masks, num_masks, generator)
        return {
            "loss_ce": self.class_weight * loss_ce,
            "loss_mask": self.mask_weight * loss_mask,
            "loss_dice": self.dice_weight * loss_dice,
        }

    def class_loss(
        self, pred_logits: Tensor, targets: list[dict], indices: Indices, batch_idx: Tensor, query_idx: Tensor
    ) -> Tensor:
        """Weighted-mean CE over all B*Q queries (sum w_i nll_i / sum w_i), no-object weight for unmatched ones."""
        target_classes = torch.full(
            pred_logits.shape[:2], self.num_classes, dtype=torch.int64, device=pred_logits.device
        )
        matched_labels = [t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]
        target_classes[batch_idx, query_idx] = torch.cat(matched_labels).to(pred_logits.device)
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            return F.cross_entropy(
                pred_logits.float().transpose(1, 2),
                target_classes,
                weight=self.empty_weight.to(device=pred_logits.device, dtype=torch.float32),
            )

    def mask_losses(
        self, matched_masks: Tensor, target_masks: Tensor | MatchedTargets, num_masks: float,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Unweighted (mask, dice) losses of matched logits `[M,h,w]` vs float targets `[M,H,W]` (or, for the
        point loss, `MatchedTargets` that name them), each summed over masks and divided by `num_masks`, in fp32."""
        if matched_masks.shape[0] == 0:
            # Keep the graph connected (DDP expects every output to get a gradient), value exactly 0.
            zero = matched_masks.float().flatten()[:0].sum()
            return zero, zero.clone()
        with torch.autocast(device_type=matched_masks.device.type, enabled=False):
            logits = matched_masks.float()[:, None]  # [M,1,h,w]
            if self.mask_loss == "points":
                with torch.no_grad():
                    coords = uncertain_point_coords(
                        logits, self.num_points, self.oversample_ratio, self.importance_sample_ratio, generator
                    )
                    if isinstance(target_masks, MatchedTargets):
                        point_targets = point_sample_matched(target_masks.masks, target_masks.indices, coords)
                    else:
                        point_targets = point_sample(target_masks.float()[:, None], coords)[:, 0]
                point_logits = point_sample(logits, coords)[:, 0]
                return (
                    sigmoid_ce_loss(point_logits, point_targets, num_masks),
                    dice_loss(point_logits, point_targets, num_masks),
                )
            targets = target_masks.float()[:, None]
            upsampled = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
            upsampled, flat_targets = upsampled.flatten(1), targets.flatten(1)
            return (
                sigmoid_focal_loss(upsampled, flat_targets, num_masks, self.focal_alpha, self.focal_gamma),
                dice_loss(upsampled, flat_targets, num_masks),
            )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weights(ce/mask/dice)={self.class_weight}/{self.mask_weight}/"
            f"{self.dice_weight}, no_object_weight={self.no_object_weight}, mask_loss={self.mask_loss!r}, "
            f"num_points={self.num_points}, deep_supervision={self.deep_supervision}"
        )
