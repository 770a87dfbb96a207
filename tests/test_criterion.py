import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from random_inputs import random_targets as shared_random_targets

from mask2former.training.criterion import SetCriterion, compute_num_masks
from mask2former.training.matcher import HungarianMatcher

NUM_CLASSES = 6


# The criterion tests' targets: NUM_CLASSES classes.
random_targets = functools.partial(shared_random_targets, num_classes=NUM_CLASSES)


def random_outputs(batch_size, num_queries=10, size=16, num_aux=3, seed=0, requires_grad=False, device="cpu"):
    generator = torch.Generator().manual_seed(seed)

    def prediction():
        logits = torch.randn(batch_size, num_queries, NUM_CLASSES + 1, generator=generator)
        masks = 3 * torch.randn(batch_size, num_queries, size, size, generator=generator)
        return {
            "pred_logits": logits.to(device).requires_grad_(requires_grad),
            "pred_masks": masks.to(device).requires_grad_(requires_grad),
        }

    aux = [prediction() for _ in range(num_aux)]
    return {**prediction(), "aux_outputs": aux}


def criterion(num_points=64, **kwargs):
    return SetCriterion(NUM_CLASSES, HungarianMatcher(num_points=num_points), num_points=num_points, **kwargs)


def to_hf_names(key):
    return key.replace("loss_cross_entropy", "loss_ce")


def test_equals_transformers_mask2former_loss_with_the_same_points(device):
    hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    from transformers import Mask2FormerConfig

    num_points = 64
    targets = random_targets([3, 0, 4], device=device)  # an image without targets keeps the random streams aligned
    outputs = random_outputs(3, device=device)
    config = Mask2FormerConfig(
        num_labels=NUM_CLASSES,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
        train_num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    reference = hf.Mask2FormerLoss(config, weight_dict={}).to(device)
    # Some transformers versions hard-code the matcher's class cost to 1.0 (transformers#38559); align it.
    reference.matcher.cost_class = 2.0

    def reference_losses(seed):
        # Same global seed and the same order of draws (final then aux; per layer: one draw per image
        # for matching, then the oversampled and the uniform loss points) => identical points.
        torch.manual_seed(seed)
        raw = reference(
            masks_queries_logits=outputs["pred_masks"],
            class_queries_logits=outputs["pred_logits"],
            mask_labels=[t["masks"].float() for t in targets],
            class_labels=[t["labels"] for t in targets],
            auxiliary_predictions=[
                {"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
                for a in outputs["aux_outputs"]
            ],
        )
        weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
        return {
            to_hf_names(key): value * next(w for name, w in weights.items() if key.startswith(name))
            for key, value in raw.items()
        }

    torch.manual_seed(123)
    ours = criterion(num_points)(outputs, targets)
    expected = reference_losses(123)
    assert sorted(ours) == sorted(expected)
    assert len(ours) == 12
    for key in ours:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
    # With other random points the point losses differ far beyond the tolerance.
    other = reference_losses(124)
    assert abs(other["loss_mask"] - ours["loss_mask"]) > 1e-3 * ours["loss_mask"]


def test_full_resolution_variant_equals_transformers_maskformer_loss(device):
    hf = pytest.importorskip("transformers.models.maskformer.modeling_maskformer")
    targets = random_targets([2, 3], device=device)
    outputs = random_outputs(2, num_aux=2, device=device)
    reference = hf.MaskFormerLoss(
        num_labels=NUM_CLASSES,
        matcher=hf.MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0),
        weight_dict={},
        eos_coef=0.1,
    ).to(device)
    raw = reference(
        masks_queries_logits=outputs["pred_masks"],
        class_queries_logits=outputs["pred_logits"],
        mask_labels=[t["masks"].float() for t in targets],
        class_labels=[t["labels"] for t in targets],
        auxiliary_predictions=[
            {"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
            for a in outputs["aux_outputs"]
        ],
    )
    weights = {"loss_cross_entropy": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}
    expected = {
        to_hf_names(k): v * next(w for name, w in weights.items() if k.startswith(name)) for k, v in raw.items()
    }
    full = SetCriterion(
        NUM_CLASSES,
        HungarianMatcher(class_weight=1.0, mask_weight=20.0, dice_weight=1.0, mask_cost="full"),
        class_weight=1.0,
        mask_weight=20.0,
        dice_weight=1.0,
        mask_loss="full",
    )
    ours = full(outputs, targets)
    assert sorted(ours) == sorted(expected)
    for key in ours:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_class_loss_is_weighted_mean_over_all_queries(device):
    targets = random_targets([2, 1], device=device)
    outputs = random_outputs(2, num_queries=5, num_aux=0, device=device)
    losses, indices = criterion()(outputs, targets, return_indices=True)
    target_classes = torch.full((2, 5), NUM_CLASSES, device=device)
    for b, (q, g) in enumerate(indices[-1]):
        target_classes[b, q] = targets[b]["labels"][g]
    nll = -outputs["pred_logits"].log_softmax(-1).gather(-1, target_classes[..., None])[..., 0]
    weight = torch.where(target_classes == NUM_CLASSES, 0.1, 1.0)
    torch.testing.assert_close(losses["loss_ce"], 2.0 * (weight * nll).sum() / weight.sum())


def test_gradients_reach_logits_and_masks_of_every_layer(device):
    targets = random_targets([3, 1], device=device)
    outputs = random_outputs(2, num_aux=2, requires_grad=True, device=device)
    losses = criterion()(outputs, targets)
    total = SetCriterion.total_loss(losses)
    assert torch.isfinite(total)
    torch.testing.assert_close(total, sum(losses.values()))
    total.backward()
    for prediction in [outputs, *outputs["aux_outputs"]]:
        for name in ("pred_logits", "pred_masks"):
            grad = prediction[name].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_zero_target_images(device):
    outputs = random_outputs(2, num_aux=1, requires_grad=True, device=device)
    empty = {"labels": torch.zeros(0, dtype=torch.int64, device=device),
             "masks": torch.zeros(0, 64, 64, dtype=torch.bool, device=device)}
    # One empty image among non-empty ones.
    losses = criterion()(outputs, [random_targets([2], device=device)[0], empty])
    assert all(torch.isfinite(v) for v in losses.values())
    # A batch without any target: masks contribute exactly 0, CE pushes every query to no-object.
    losses = criterion()(outputs, [empty, empty])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice_0"].item() == 0
    no_object = torch.full((2, 10), NUM_CLASSES, device=device)
    expected_ce = 2.0 * F.cross_entropy(outputs["pred_logits"].detach().transpose(1, 2), no_object)
    torch.testing.assert_close(losses["loss_ce"].detach(), expected_ce)
    SetCriterion.total_loss(losses).backward()
    assert outputs["pred_masks"].grad is not None
    assert outputs["pred_masks"].grad.abs().sum() == 0


def test_same_seed_is_bit_identical_and_other_seed_differs(device):
    targets = random_targets([3, 2], device=device)
    outputs = random_outputs(2, device=device)

    def run(seed, use_generator):
        if use_generator:
            return criterion()(outputs, targets, generator=torch.Generator(device).manual_seed(seed))
        torch.manual_seed(seed)
        return criterion()(outputs, targets)

    for use_generator in (False, True):
        first, second, other = run(0, use_generator), run(0, use_generator), run(1, use_generator)
        assert all(torch.equal(first[k], second[k]) for k in first)
        assert not torch.equal(first["loss_mask"], other["loss_mask"])


def test_return_indices_and_loss_for_assignment():
    targets = random_targets([3, 2])
    outputs = random_outputs(2, num_aux=2)
    loss = criterion()
    losses, indices = loss(outputs, targets, return_indices=True, generator=torch.Generator().manual_seed(5))
    assert len(indices) == 3  # aux 0, aux 1, final
    replay = torch.Generator().manual_seed(5)
    final_indices = loss.matcher(outputs["pred_logits"], outputs["pred_masks"], targets, generator=replay)
    for (q, g), (q_ref, g_ref) in zip(indices[-1], final_indices):
        assert torch.equal(q, q_ref) and torch.equal(g, g_ref)
    # The shared core with the same assignment and the same random state gives the same terms.
    direct = loss.loss_for_assignment(
        outputs["pred_logits"], outputs["pred_masks"], targets, final_indices, 5.0, replay
    )
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        assert torch.equal(direct[key], losses[key])
    # A different (direct) assignment changes the loss.
    swapped = [(q.flip(0), g) for q, g in final_indices]
    other = loss.loss_for_assignment(outputs["pred_logits"], outputs["pred_masks"], targets, swapped, 5.0)
    assert not torch.allclose(other["loss_dice"], losses["loss_dice"])


def test_deep_supervision_off_and_model_output_object():
    targets = random_targets([1, 1])
    outputs = random_outputs(2, num_aux=2)

    class Output:
        def as_dict(self):
            return outputs

    losses = criterion(deep_supervision=False)(Output(), targets)
    assert sorted(losses) == ["loss_ce", "loss_dice", "loss_mask"]


def test_padding_counts_as_background():
    # A target stored in a smaller frame is zero-padded to the batch frame (bottom/right).
    targets = random_targets([2, 2])
    outputs = random_outputs(2, num_aux=0)
    cropped = [targets[0], {"labels": targets[1]["labels"], "masks": targets[1]["masks"][:, :48, :40]}]
    padded = [targets[0], {"labels": targets[1]["labels"], "masks": F.pad(cropped[1]["masks"], (0, 24, 0, 16))}]
    torch.manual_seed(0)
    from_cropped = criterion()(outputs, cropped)
    torch.manual_seed(0)
    from_padded = criterion()(outputs, padded)
    assert all(torch.equal(from_cropped[k], from_padded[k]) for k in from_cropped)


def test_point_losses_are_fp32_under_autocast(device):
    targets = random_targets([2, 2], device=device)
    outputs = random_outputs(2, num_aux=0, device=device)
    half = {k: v.bfloat16() for k, v in outputs.items() if k != "aux_outputs"}
    torch.manual_seed(0)
    expected = criterion()({k: v.float() for k, v in half.items()}, targets)
    torch.manual_seed(0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        losses = criterion()(half, targets)
    for key in losses:
        assert losses[key].dtype == torch.float32
        torch.testing.assert_close(losses[key], expected[key], rtol=0, atol=0)


def test_num_masks_is_clamped():
    assert compute_num_masks([{"labels": torch.zeros(0, dtype=torch.int64)}], torch.device("cpu")) == 1.0
    assert compute_num_masks([{"labels": torch.zeros(3, dtype=torch.int64)}] * 2, torch.device("cpu")) == 6.0


def _distributed_num_masks(rank, tmp, counts):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=len(counts))
    try:
        num_masks = compute_num_masks([{"labels": torch.zeros(counts[rank], dtype=torch.int64)}], torch.device("cpu"))
        with open(os.path.join(tmp, f"rank{rank}"), "w") as f:
            f.write(repr(num_masks))
    finally:
        dist.destroy_process_group()


def test_num_masks_is_averaged_over_processes():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_distributed_num_masks, args=(tmp, [3, 6]), nprocs=2)
        results = [float(open(os.path.join(tmp, f"rank{rank}")).read()) for rank in range(2)]
    assert results == [4.5, 4.5]


def test_rejects_bad_configuration_and_targets():
    with pytest.raises(ValueError, match="mask_cost='full'"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), mask_loss="full")
    with pytest.raises(ValueError, match="mask_loss"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), mask_loss="pixels")
    targets = random_targets([1, 1])
    targets[1]["labels"] = torch.tensor([NUM_CLASSES])
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\]"):
        criterion()(random_outputs(2), targets)
