import math

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from mask2former.training.losses import (
    dice_loss,
    pairwise_dice_cost,
    neg_log_sigmoid,
    pairwise_sigmoid_ce_cost,
    pairwise_sigmoid_focal_cost,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
)


def test_dice_loss_hand_computed():
    # logit 0 -> p = 0.5 on 4 points; targets [1, 1, 0, 0]: 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4
    logits = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(dice_loss(logits, targets, 1.0), torch.tensor(0.4))
    # Two identical masks normalised by 4 masks -> 2 * 0.4 / 4
    torch.testing.assert_close(dice_loss(logits.repeat(2, 1), targets.repeat(2, 1), 4.0), torch.tensor(0.2))


def test_sigmoid_ce_loss_hand_computed():
    logits = torch.tensor([[0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    torch.testing.assert_close(sigmoid_ce_loss(logits, targets, 1.0), torch.tensor(expected))


def test_sigmoid_focal_loss_matches_torchvision():
    logits = torch.randn(3, 50) * 3
    targets = (torch.rand(3, 50) > 0.5).float()
    expected = tv_sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none").mean(1).sum() / 2.0
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 2.0), expected)


def test_neg_log_sigmoid_equals_bce_with_target_one():
    logits = torch.cat([torch.randn(1000) * 30, torch.tensor([0.0, 1e-8, -1e-8, 88.0, -88.0, 1e4, -1e4])])
    expected = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    torch.testing.assert_close(neg_log_sigmoid(logits), expected, rtol=1e-6, atol=6e-8)
    special = neg_log_sigmoid(torch.tensor([float("inf"), float("-inf"), float("nan")]))
    assert special[0] == 0 and special[1] == float("inf") and special[2].isnan()
    # A transposed (matcher-layout) input gives the same values.
    torch.testing.assert_close(neg_log_sigmoid(logits.view(-1, 1).expand(-1, 3).T), expected.expand(3, -1))


def test_pairwise_costs_equal_per_pair_losses():
    torch.manual_seed(0)
    logits = torch.randn(5, 30) * 2
    targets = torch.rand(3, 30)  # soft targets, as bilinear point samples are
    ce = pairwise_sigmoid_ce_cost(logits, targets)
    dice = pairwise_dice_cost(logits, targets)
    # The focal factor depends on the target, so its pairwise form is exact for binary targets
    # (the full-resolution matcher uses nearest-downsampled binary masks).
    binary_targets = (targets > 0.5).float()
    focal = pairwise_sigmoid_focal_cost(logits, binary_targets)
    assert ce.shape == dice.shape == focal.shape == (5, 3)
    for q in range(5):
        for g in range(3):
            pair = logits[q : q + 1], targets[g : g + 1]
            torch.testing.assert_close(ce[q, g], sigmoid_ce_loss(*pair, 1.0))
            torch.testing.assert_close(dice[q, g], dice_loss(*pair, 1.0))
            torch.testing.assert_close(focal[q, g], sigmoid_focal_loss(pair[0], binary_targets[g : g + 1], 1.0))
    broadcast_ce = F.binary_cross_entropy_with_logits(
        logits[:, None].expand(5, 3, 30), targets[None].expand(5, 3, 30), reduction="none"
    )
    torch.testing.assert_close(ce, broadcast_ce.mean(-1))
