"""Binary mask losses and their pairwise (matching-cost) forms.

Every function takes logits and soft targets flattened to `[N, P]` (P = points or pixels).
Per-mask losses return the sum over masks divided by `num_masks`; pairwise costs return a
`[num_preds, num_targets]` matrix of per-pair mean/ratio values, built with matmuls so that
the `[num_preds, num_targets, P]` tensor is never materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_ce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Binary cross-entropy with logits, mean over points, summed over masks, / num_masks."""
    per_point = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return per_point.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) per mask with p = sigmoid, summed, / num_masks."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, num_masks: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss (RetinaNet) per point, mean over points, summed over masks, / num_masks.
    A negative `alpha` disables the class-balance factor."""
    probs = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_correct = probs * targets + (1 - probs) * (1 - targets)
    loss = ce * (1 - p_correct) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def pairwise_sigmoid_ce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean-over-points BCE for every (prediction, target) pair: `[Q,P] x [G,P] -> [Q,G]`.

    BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0) and BCE(x, 0) = BCE(x, 1) + x, so BCE(x, t) = BCE(x, 1) +
    (1 - t) * x: the pair sum is a row sum plus one matmul (the reference's two matmuls, with one pass less).
    """
    num_points = logits.shape[1]
    # Written as (targets @ logits.T).T: fast for both layouts of logits (the matcher passes a transposed view,
    # [P, Q] in memory, for which logits @ targets.T takes MKL's slow path: 3 ms instead of 0.25 ms).
    return (neg_log_sigmoid(logits).sum(1, keepdim=True) + ((1 - targets) @ logits.T).T) / num_points


def neg_log_sigmoid(logits: Tensor) -> Tensor:
    """BCE(x, 1) = -log(sigmoid(x)) = max(-x, 0) + log(1 + exp(-|x|)), stable for any x.

    Written out because PyTorch's CPU log_sigmoid and log1p kernels are not vectorised (~4x slower on the
    matcher's [100, 12544]); log(1 + y) for log1p(y) is off by under 6e-8 absolute, since 1 + y is in (1, 2].
    """
    return F.relu(-logits) + logits.abs().neg().exp_().add_(1).log_()


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss for every (prediction, target) pair: `[Q,P] x [G,P] -> [Q,G]`."""
    probs = logits.sigmoid()
    numerator = 2 * (targets @ probs.T).T  # the layout note of pairwise_sigmoid_ce_cost
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_sigmoid_focal_cost(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Mean-over-points focal loss for every (prediction, target) pair: `[Q,P] x [G,P] -> [Q,G]`.

    Splits the loss into its t=1 and t=0 parts, so it equals `sigmoid_focal_loss` per pair only for
    binary targets (MaskFormer's matcher nearest-downsamples the masks, so they are binary).
    """
    num_points = logits.shape[1]
    probs = logits.sigmoid()
    focal_pos = (1 - probs) ** gamma * F.binary_cross_entropy_with_logits(
        logits, torch.ones_like(logits), reduction="none"
    )
    focal_neg = probs**gamma * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    if alpha >= 0:
        focal_pos = focal_pos * alpha
        focal_neg = focal_neg * (1 - alpha)
    return (focal_pos @ targets.T + focal_neg @ (1 - targets).T) / num_points
