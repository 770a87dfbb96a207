import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from mask2former.config import MaskPilotingConfig
from mask2former.modeling.model import Mask2Former
from mask2former.modeling.piloting import QueryPiloting
from mask2former.modeling.transformer_decoder import unblock_empty_rows
from mask2former.training.criterion import SetCriterion
from mask2former.training.matcher import HungarianMatcher
from mask2former.training.mask_piloting import (
    MaskPiloting,
    MaskPilotingCriterion,
    build_mask_piloting,
    direct_assignment,
    ground_truth_attention_mask,
    mask_piloting_losses,
    self_attention_mask,
)

from conftest import tiny_swin_config

NUM_CLASSES = 5


def box_target(count: int, size: int = 64, first_label: int = 0) -> dict:
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for index in range(count):
        masks[index, 4 * index: 4 * index + 20, 8 + 3 * index: 30 + 3 * index] = True
    return {"labels": (torch.arange(count) + first_label) % NUM_CLASSES, "masks": masks}


def piloting_config(**overrides) -> MaskPilotingConfig:
    values = dict(enabled=True, num_groups=2, label_noise=0.0, point_noise=0.0)
    values.update(overrides)
    return MaskPilotingConfig(**values)


@functools.lru_cache(maxsize=1)
def _build_models():
    torch.manual_seed(0)
    plain = Mask2Former(tiny_swin_config())
    torch.manual_seed(0)
    piloted = Mask2Former(tiny_swin_config(mask_piloting=True))
    return plain, piloted


def models():
    """A plain Mask2Former and the same weights with the MP label embedding (created last, same seed); built once
    (tests only read the weights), returned in training mode without gradients."""
    plain, piloted = _build_models()
    for model in (plain, piloted):
        model.train()
        model.zero_grad(set_to_none=True)
    return plain, piloted


def criterion(num_points: int = 256) -> SetCriterion:
    return SetCriterion(NUM_CLASSES, HungarianMatcher(num_points=num_points), num_points=num_points)


def all_predictions(outputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(a["pred_logits"], a["pred_masks"]) for a in outputs.aux_outputs] + [(outputs.pred_logits, outputs.pred_masks)]


# ----- layout --------------------------------------------------------------------------------------------------


def test_self_attention_mask_two_groups():
    blocked = self_attention_mask(num_groups=2, group_size=2, num_queries=3)
    x, o = True, False
    expected = torch.tensor([
        # group 0 | group 1 | matching
        [o, o, x, x, o, o, o],
        [o, o, x, x, o, o, o],
        [x, x, o, o, o, o, o],
        [x, x, o, o, o, o, o],
        [x, x, x, x, o, o, o],
        [x, x, x, x, o, o, o],
        [x, x, x, x, o, o, o],
    ])
    assert torch.equal(blocked, expected)


def test_direct_assignment_uneven_counts():
    indices = direct_assignment([2, 0, 1], num_groups=2, max_num=2)
    assert [slots.tolist() for slots, _ in indices] == [[0, 1, 2, 3], [], [0, 2]]
    assert [targets.tolist() for _, targets in indices] == [[0, 1, 0, 1], [], [0, 0]]


def test_extend_queries_layout_and_self_mask_for_uneven_counts():
    embedding = torch.nn.Embedding(NUM_CLASSES, 8)
    targets = [box_target(2, first_label=1), box_target(1, first_label=4)]
    piloting = MaskPiloting.build(targets, piloting_config(), embedding)
    assert (piloting.num_groups, piloting.max_num, piloting.num_piloted) == (2, 2, 4)
    queries, query_pos = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    extended, extended_pos, blocked = piloting.extend_queries(queries, query_pos)
    assert extended.shape == (2, 7, 8) and blocked.shape == (1, 1, 7, 7)
    assert torch.equal(blocked[0, 0], self_attention_mask(2, 2, 3))
    assert torch.equal(extended[:, 4:], queries)
    weight = embedding.weight.detach()
    for group in range(2):  # slot g * max_num + j holds target j's label embedding
        torch.testing.assert_close(extended[0, 2 * group], weight[1], rtol=0, atol=0)
        torch.testing.assert_close(extended[0, 2 * group + 1], weight[2], rtol=0, atol=0)
        torch.testing.assert_close(extended[1, 2 * group], weight[4], rtol=0, atol=0)
        assert not extended[1, 2 * group + 1].any()  # unused slot: zero vector
    assert not extended_pos[:, :4].any() and torch.equal(extended_pos[:, 4:], query_pos)
    assert piloting.extend_queries(queries, None)[1] is None


# ----- attention masks ---------------------------------------------------------------------------------------


def test_ground_truth_attention_mask_area_rule_hand_checked():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 0, 0] = True  # 1 of 16 pixels of bin (0, 0) at 2x2
    mask[0, 5, 6] = True  # bin (1, 1)
    blocked = ground_truth_attention_mask(mask, (2, 2))
    assert blocked.tolist() == [[False, True, True, False]]
    # 4x4 bins of 2x2 pixels: each set pixel marks its bin foreground
    assert (~ground_truth_attention_mask(mask, (4, 4))).nonzero()[:, 1].tolist() == [0, 4 * 2 + 3]
    # an empty mask blocks everything (the decoder's empty-row fix then lets it attend everywhere)
    assert ground_truth_attention_mask(torch.zeros(1, 8, 8, dtype=torch.bool), (2, 2)).all()


def test_override_uses_ground_truth_at_each_level():
    embedding = torch.nn.Embedding(NUM_CLASSES, 8)
    targets = [box_target(3), box_target(1)]
    piloting = MaskPiloting.build(targets, piloting_config(), embedding)
    num_piloted, num_queries = piloting.num_piloted, 5
    for layer, size in enumerate([(2, 2), (4, 4), (8, 8), (2, 2)]):
        predicted = torch.rand(2, 1, num_piloted + num_queries, size[0] * size[1]) < 0.5
        blocked = piloting.override_attention_mask(predicted, size, layer)
        assert torch.equal(blocked[:, :, num_piloted:], predicted[:, :, num_piloted:])  # matching rows untouched
        for group in range(2):
            rows = blocked[0, 0, group * 3: group * 3 + 3]
            assert torch.equal(rows, ground_truth_attention_mask(targets[0]["masks"], size))
            assert torch.equal(blocked[1, 0, group * 3], ground_truth_attention_mask(targets[1]["masks"], size)[0])
            assert blocked[1, 0, group * 3 + 1: group * 3 + 3].all()  # unused slots fully blocked ...
            assert not unblock_empty_rows(blocked)[1, 0, group * 3 + 1].any()  # ... until the empty-row fix


def test_all_layers_false_pilots_layers_zero_to_three():
    piloting = MaskPiloting.build([box_target(1)], piloting_config(all_layers=False), torch.nn.Embedding(5, 8))
    assert isinstance(piloting, QueryPiloting)  # the hooks the decoder calls, declared on the modeling side
    predicted = torch.zeros(1, 1, 2 + 3, 4, dtype=torch.bool)
    assert [piloting.override_attention_mask(predicted, (2, 2), layer) is predicted for layer in range(6)] == [
        False, False, False, False, True, True]


def test_point_noise_flip_rate():
    size, groups, noise = (32, 32), 200, 0.2
    mask = torch.zeros(1, 128, 128, dtype=torch.bool)
    mask[0, :64, :64] = True  # foreground area 256 of 1024 at 32x32
    target = {"labels": torch.zeros(1, dtype=torch.int64), "masks": mask}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 128, 128, dtype=torch.bool)}
    generator = torch.Generator().manual_seed(0)
    piloting = MaskPiloting.build([target, empty], piloting_config(num_groups=groups, point_noise=noise),
                                  torch.nn.Embedding(5, 8), generator)
    clean = ground_truth_attention_mask(mask, size)[0]
    first, second = piloting.attention_mask(size), piloting.attention_mask(size)
    flips = first[0] ^ clean
    trials, probability = groups * 1024, noise * 256 / 1024
    expected, sigma = trials * probability, (trials * probability * (1 - probability)) ** 0.5
    assert abs(flips.sum().item() - expected) < 5 * sigma
    assert (flips & ~clean).any() and (flips & clean).any()  # both fg->bg and bg->fg
    assert not torch.equal(first, second)  # fresh noise per layer
    assert first[1].all()  # the image without targets: no foreground, no flips


def test_label_noise_rate():
    count, noise = 4000, 0.2
    labels = torch.arange(count) % 10
    target = {"labels": labels, "masks": torch.ones(count, 4, 4, dtype=torch.bool)}
    embedding = torch.nn.Embedding(10, 4)
    piloting = MaskPiloting.build([target], piloting_config(num_groups=1, label_noise=noise), embedding,
                                  torch.Generator().manual_seed(0))
    changed = (piloting.noisy_labels != labels).float().mean().item()
    expected = noise * (1 - 1 / 10)  # a replacement may draw the same class
    assert abs(changed - expected) < 5 * (expected * (1 - expected) / count) ** 0.5
    clean = MaskPiloting.build([target], piloting_config(num_groups=1, label_noise=0.0), embedding)
    assert torch.equal(clean.noisy_labels, labels)


def test_build_rejects_bad_labels_and_config():
    embedding = torch.nn.Embedding(NUM_CLASSES, 8)
    bad = {"labels": torch.tensor([NUM_CLASSES]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="target 0"):
        MaskPiloting.build([bad], piloting_config(), embedding)
    with pytest.raises(ValueError, match="num_groups"):
        MaskPiloting.build([box_target(1)], piloting_config(num_groups=0), embedding)


# ----- model --------------------------------------------------------------------------------------------------


def test_piloting_off_is_bit_identical_to_plain_mask2former():
    plain, piloted = models()
    plain_state, piloted_state = plain.state_dict(), piloted.state_dict()
    assert not any("label_embed" in key for key in plain_state)
    assert set(piloted_state) - set(plain_state) == {"transformer_decoder.label_embed.weight"}
    assert all(torch.equal(plain_state[key], piloted_state[key]) for key in plain_state)
    images = torch.randn(2, 3, 64, 64)
    targets = [box_target(3), box_target(1)]
    outputs = {}
    for training in (False, True):
        plain.train(training)
        piloted.train(training)
        # in eval mode a piloting batch is ignored
        piloting = None if training else MaskPiloting.build(targets, piloting_config(), piloted.transformer_decoder.label_embed)
        expected, actual = outputs[training] = plain(images), piloted(images, piloting=piloting)
        assert actual.piloted is None
        for (a, b), (c, d) in zip(all_predictions(expected), all_predictions(actual)):
            assert torch.equal(a, c) and torch.equal(b, d)
    expected, actual = outputs[True]
    expected_losses = criterion()(expected, targets, generator=torch.Generator().manual_seed(1))
    losses = MaskPilotingCriterion(criterion())(actual, targets, generator=torch.Generator().manual_seed(1))
    for key, value in expected_losses.items():
        assert torch.equal(value, losses[key]), key
    mp_keys = set(losses) - set(expected_losses)
    assert len(mp_keys) == 3 * 4 and all(losses[key] == 0 for key in mp_keys)


def test_matching_queries_do_not_see_piloting_queries():
    plain, piloted = models()
    images = torch.randn(2, 3, 64, 64)
    targets = [box_target(3), box_target(1)]
    cross = {}
    hooks = [
        model.transformer_decoder.layers[0].cross_attn.register_forward_hook(
            lambda module, inputs, output, name=name: cross.__setitem__(name, output))
        for name, model in (("plain", plain), ("mp", piloted))
    ]
    piloting = MaskPiloting.build(targets, piloting_config(point_noise=0.2, label_noise=0.2),
                                  piloted.transformer_decoder.label_embed, torch.Generator().manual_seed(0))
    try:
        expected, actual = plain(images), piloted(images, piloting=piloting)
    finally:
        for hook in hooks:
            hook.remove()
    num_piloted = piloting.num_piloted
    assert actual.piloted["pred_logits"].shape == (2, num_piloted, NUM_CLASSES + 1)
    assert len(actual.piloted["aux_outputs"]) == len(actual.aux_outputs)
    # Row-wise computations are exact: the initial prediction and the first cross-attention (each query attends
    # on its own with its own mask).
    predictions, piloted_predictions = all_predictions(expected), all_predictions(actual)
    assert torch.equal(predictions[0][0], piloted_predictions[0][0])
    assert torch.equal(predictions[0][1], piloted_predictions[0][1])
    assert torch.equal(cross["plain"], cross["mp"][:, num_piloted:])
    # Self-attention then runs over a longer, masked key set: equal up to float rounding.
    for (a, b), (c, d) in zip(predictions, piloted_predictions):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(d, b, rtol=1e-4, atol=1e-5)


def test_zero_target_images_and_gradient_to_label_embed():
    _, model = models()
    targets = [box_target(3), box_target(0)]
    config = piloting_config(label_noise=0.2, point_noise=0.2)
    piloting = build_mask_piloting(model, targets, config, torch.Generator().manual_seed(0))
    outputs = model(torch.randn(2, 3, 64, 64), piloting=piloting)
    losses = MaskPilotingCriterion(criterion())(outputs, targets, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    gradient = model.transformer_decoder.label_embed.weight.grad
    used = piloting.noisy_labels.unique()
    assert gradient[used].abs().sum(1).gt(0).all()
    unused = torch.ones(NUM_CLASSES, dtype=torch.bool)
    unused[used] = False
    assert not gradient[unused].any()  # only the embedded classes get a gradient


def test_batch_without_targets_falls_back_to_plain_path():
    plain, piloted = models()
    targets = [box_target(0), box_target(0)]
    assert build_mask_piloting(piloted, targets, piloting_config()) is None
    images = torch.randn(2, 3, 64, 64)
    expected, actual = plain(images), piloted(images, piloting=None)
    assert actual.piloted is None and torch.equal(expected.pred_logits, actual.pred_logits)
    losses = MaskPilotingCriterion(criterion())(actual, targets)
    assert losses["loss_mask_mp"] == 0 and losses["loss_ce_mp_2"] == 0
    sum(losses.values()).backward()
    # DDP needs every parameter in the graph: the label embedding gets a (zero) gradient
    assert piloted.transformer_decoder.label_embed.weight.grad is not None


def test_eval_mode_and_build_need_a_training_model_with_label_embedding():
    plain, piloted = models()
    assert build_mask_piloting(piloted.eval(), [box_target(1)], piloting_config()) is None
    assert build_mask_piloting(piloted.train(), [box_target(1)], piloting_config(enabled=False)) is None
    with pytest.raises(ValueError, match="model.mask_piloting"):
        build_mask_piloting(plain.train(), [box_target(1)], piloting_config())
    with pytest.raises(ValueError, match="masked decoder"):
        Mask2Former(tiny_swin_config(mask_piloting=True, transformer_decoder="standard", pixel_decoder="fpn"))


# ----- losses --------------------------------------------------------------------------------------------------


def fake_piloted(logits: torch.Tensor, masks: torch.Tensor, num_groups: int, max_num: int, num_aux: int = 0) -> dict:
    aux = [{"pred_logits": logits + i, "pred_masks": masks - i} for i in range(num_aux)]
    return {"pred_logits": logits, "pred_masks": masks, "aux_outputs": aux, "num_groups": num_groups,
            "max_num": max_num}


def test_class_loss_covers_all_slots_with_direct_assignment():
    targets = [box_target(2, first_label=1), box_target(1, first_label=3)]
    logits, masks = torch.randn(2, 4, NUM_CLASSES + 1), torch.randn(2, 4, 16, 16)
    set_criterion = criterion()
    losses = mask_piloting_losses(fake_piloted(logits, masks, 2, 2, num_aux=2), targets, set_criterion)
    assert sorted(losses) == sorted(f"loss_{k}_mp{s}" for k in ("ce", "mask", "dice") for s in ("", "_0", "_1"))
    no_object = NUM_CLASSES
    # slot g * 2 + j <-> target j; the unused slots of image 1 are trained toward no-object
    target_classes = torch.tensor([[1, 2, 1, 2], [3, no_object, 3, no_object]])
    expected = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=set_criterion.empty_weight)
    torch.testing.assert_close(losses["loss_ce_mp"], set_criterion.class_weight * expected)
    mask_only = mask_piloting_losses(fake_piloted(logits, masks, 2, 2), targets, set_criterion, class_loss=False)
    assert sorted(mask_only) == ["loss_dice_mp", "loss_mask_mp"]


def test_mask_losses_are_normalised_by_num_masks_times_groups():
    # Full-resolution losses are deterministic: two identical groups must give the one-group loss.
    set_criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(mask_cost="full"), mask_loss="full")
    targets = [box_target(2), box_target(1)]
    logits, masks = torch.randn(2, 2, NUM_CLASSES + 1), torch.randn(2, 2, 16, 16)
    one = mask_piloting_losses(fake_piloted(logits, masks, 1, 2), targets, set_criterion)
    two = mask_piloting_losses(fake_piloted(logits.repeat(1, 2, 1), masks.repeat(1, 2, 1, 1), 2, 2), targets,
                               set_criterion)
    for key in ("loss_mask_mp", "loss_dice_mp", "loss_ce_mp"):
        torch.testing.assert_close(two[key], one[key])
    # and the mask loss of target j is computed on slot j (swapping the predictions changes it)
    swapped = mask_piloting_losses(fake_piloted(logits, masks.flip(1), 1, 2), targets, set_criterion)
    assert not torch.allclose(swapped["loss_mask_mp"], one["loss_mask_mp"])


def test_no_piloting_output_gives_zero_terms():
    losses = mask_piloting_losses(None, [box_target(1)], criterion(), num_aux=3, class_loss=False)
    assert sorted(losses) == sorted(f"loss_{k}_mp{s}" for k in ("mask", "dice") for s in ("", "_0", "_1", "_2"))
    assert all(value == 0 for value in losses.values())


def test_criterion_wrapper_passes_indices_through():
    _, model = models()
    targets = [box_target(2), box_target(1)]
    outputs = model(torch.randn(2, 3, 64, 64), piloting=build_mask_piloting(model, targets, piloting_config()))
    losses, indices = MaskPilotingCriterion(criterion())(outputs, targets, return_indices=True)
    assert len(indices) == len(outputs.aux_outputs) + 1
    assert all(q.max() < outputs.pred_logits.shape[1] for layer in indices for q, _ in layer if q.numel())
    assert "loss_dice_mp_0" in losses and "loss_dice_0" in losses


def test_piloting_config_threads_through_the_model_config():
    config = dataclasses.replace(tiny_swin_config(), mask_piloting=True, query_pos=False)
    model = Mask2Former(config)
    assert model.transformer_decoder.label_embed.weight.shape == (NUM_CLASSES, 64)
    assert model.transformer_decoder.query_embed is None
