"""Post-processing against hand-built logits whose expected segments are known, and against a literal
per-query transcription of the original Mask2Former panoptic fusion."""

import math

import pytest
import torch
import torch.nn.functional as F

from mask2former.inference.postprocess import (
    batch_postprocess,
    crop_and_resize,
    instance_inference,
    masks_to_boxes,
    panoptic_inference,
    resize_mask_logits,
    semantic_inference,
)

# 3 classes: 0 and 1 are things, 2 is stuff; column 3 is no-object
IS_THING = torch.tensor([True, True, False])
NUM_CLASSES = 3
ON, OFF = 6.0, -6.0  # mask logits: sigmoid 0.9975 / 0.0025


def class_logits(rows):
    """Logits whose softmax is exactly-ish the given (class, score) per query; the rest goes to no-object."""
    probs = torch.full((len(rows), NUM_CLASSES + 1), 1e-9, dtype=torch.float64)
    for q, (label, score) in enumerate(rows):
        probs[q, label] = score
        probs[q, NUM_CLASSES] = 1.0 - score - 1e-9 * (NUM_CLASSES - 1)
    return probs.log().float()


def masks_from_regions(regions, size=(10, 10), background=None):
    """Mask logits [Q, H, W]: ON inside each query's list of (row slice, col slice), else background[q] or OFF."""
    masks = torch.empty((len(regions), *size))
    for q, region in enumerate(regions):
        masks[q] = OFF if background is None else background[q]
        for rows, cols in region:
            masks[q, rows, cols] = ON
    return masks


# ---------------------------------------------------------------- semantic


def test_semantic_inference_is_sum_over_queries_of_class_prob_times_mask_prob():
    torch.manual_seed(0)
    cls, masks = torch.randn(5, NUM_CLASSES + 1), torch.randn(5, 6, 7)
    expected = torch.zeros(NUM_CLASSES, 6, 7)
    probs = cls.softmax(-1)
    for q in range(5):
        for c in range(NUM_CLASSES):
            expected[c] += probs[q, c] * torch.sigmoid(masks[q])
    torch.testing.assert_close(semantic_inference(cls, masks), expected)


# ---------------------------------------------------------------- resizing


def test_resize_crops_padding_before_resizing():
    # image 16x8 zero-padded to 16x16; at 1/4 the mask is positive on column 0 = the left half of the image
    logits = torch.full((1, 4, 4), -10.0)
    logits[0, :, 0] = 10.0
    out = resize_mask_logits(logits, padded_size=(16, 16), image_size=(16, 8), output_size=(32, 16))
    assert out.shape == (1, 32, 16)
    expected = torch.zeros(32, 16, dtype=torch.bool)
    expected[:, :8] = True
    assert torch.equal(out[0] > 0, expected)
    # resizing the padded canvas without the crop (the HF shortcut) would squash it to a quarter
    squashed = F.interpolate(F.interpolate(logits[None], (16, 16), mode="bilinear"), (32, 16), mode="bilinear")
    assert int((squashed[0, 0] > 0).sum()) < int(expected.sum())


def test_crop_and_resize_rejects_image_larger_than_padded():
    with pytest.raises(ValueError, match="larger than the padded"):
        crop_and_resize(torch.zeros(2, 8, 8), (9, 8), (9, 8))


# ---------------------------------------------------------------- panoptic


def test_object_mask_threshold_is_strict_greater_than():
    cls = class_logits([(0, 0.8001), (1, 0.7999)])
    masks = masks_from_regions([[(slice(0, 5), slice(0, 10))], [(slice(5, 10), slice(0, 10))]])
    segment_map, info = panoptic_inference(cls, masks, IS_THING)
    assert [(s["id"], s["category_id"]) for s in info] == [(1, 0)]
    assert torch.equal(segment_map[:5], torch.ones(5, 10, dtype=torch.int32))
    assert torch.equal(segment_map[5:], torch.zeros(5, 10, dtype=torch.int32))
    assert info[0]["score"] == pytest.approx(0.8001, abs=1e-6)
    assert info[0]["area"] == 50 and info[0]["isthing"] is True


def test_no_object_argmax_is_dropped_even_with_high_score():
    probs = torch.tensor([[0.05, 0.0, 0.0, 0.95]]) + 1e-9
    segment_map, info = panoptic_inference(probs.log(), torch.full((1, 4, 4), ON), IS_THING, 0.5)
    assert info == [] and int(segment_map.abs().sum()) == 0


def _occlusion_case(stolen):
    """Query 0 (class 0, score 0.9) owns a 10-pixel strip; query 1 (class 1, score 0.99) covers ``stolen`` of them.

    Query 1 also has a higher background logit, so it wins every background pixel in the argmax."""
    cls = class_logits([(0, 0.9), (1, 0.99)])
    masks = masks_from_regions(
        [[(slice(0, 1), slice(0, 10))], [(slice(0, 1), slice(0, stolen)), (slice(5, 7), slice(0, 10))]],
        background=[-6.0, -5.0],
    )
    return cls, masks


def test_overlap_ratio_exactly_threshold_is_kept():
    cls, masks = _occlusion_case(stolen=2)  # 8 / 10 == 0.8
    segment_map, info = panoptic_inference(cls, masks, IS_THING)
    assert [s["category_id"] for s in info] == [0, 1]
    assert info[0]["area"] == 8
    assert torch.equal(segment_map[0, 2:], torch.ones(8, dtype=torch.int32))


def test_overlap_ratio_below_threshold_is_dropped():
    cls, masks = _occlusion_case(stolen=3)  # 7 / 10 < 0.8
    segment_map, info = panoptic_inference(cls, masks, IS_THING)
    assert [s["category_id"] for s in info] == [1]
    # the dropped query's pixels become void, not re-assigned
    assert torch.equal(segment_map[0, 3:], torch.zeros(7, dtype=torch.int32))
    assert torch.equal(segment_map[0, :3], torch.ones(3, dtype=torch.int32))


def test_painted_region_is_argmax_and_prob_at_least_half():
    cls, masks = _occlusion_case(stolen=2)
    segment_map, info = panoptic_inference(cls, masks, IS_THING)
    # query 1 wins the argmax on all background pixels, but its probability there is < 0.5: they stay void
    background = torch.ones(10, 10, dtype=torch.bool)
    background[0] = False
    background[5:7] = False
    assert int(segment_map[background].abs().sum()) == 0
    assert info[1]["area"] == 2 + 20 == int((segment_map == 2).sum())


def test_overlap_ratio_uses_argmax_area_not_painted_area():
    # Original Mask2Former: mask_area = #(argmax == k), the AND with prob >= 0.5 only decides what is painted.
    # Query 0 loses 3 of its 10 pixels (painted 7) but wins 1 background pixel in the argmax -> 8 / 10 kept.
    cls, masks = _occlusion_case(stolen=3)
    masks[0, 9, 9] = -2.0  # sigmoid 0.12 * 0.9 beats query 1's sigmoid(-5) * 0.99 there
    segment_map, info = panoptic_inference(cls, masks, IS_THING)
    assert [s["category_id"] for s in info] == [0, 1]
    assert info[0]["area"] == 7 and int(segment_map[9, 9]) == 0


def test_stuff_of_one_class_is_merged_things_are_not():
    cls = class_logits([(2, 0.9), (0, 0.95), (2, 0.97), (0, 0.93)])
    masks = masks_from_regions(
        [
            [(slice(0, 3), slice(0, 10))],
            [(slice(3, 5), slice(0, 5))],
            [(slice(7, 10), slice(0, 10))],
            [(slice(3, 5), slice(5, 10))],
        ]
    )
    segment_map, info = panoptic_inference(cls, masks, IS_THING)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 2, False), (2, 0, True), (3, 0, True)]
    assert info[0]["area"] == 60 and info[0]["score"] == pytest.approx(0.97, abs=1e-6)
    assert torch.equal(segment_map[7:], torch.ones(3, 10, dtype=torch.int32))
    assert int((segment_map == 3).sum()) == 10 and int((segment_map == 0).sum()) == 20


def test_query_without_confident_pixels_is_dropped():
    cls = class_logits([(0, 0.99), (1, 0.9)])
    masks = masks_from_regions([[], [(slice(0, 2), slice(0, 2))]], background=[-0.5, -6.0])
    segment_map, info = panoptic_inference(cls, masks, IS_THING)
    assert [s["category_id"] for s in info] == [1]
    assert int((segment_map == 1).sum()) == 4


def reference_panoptic(cls, masks, is_thing, object_threshold, overlap_threshold):
    """Literal per-query transcription of MaskFormer.panoptic_inference (anchors.md section 2.4)."""
    num_classes = cls.shape[-1] - 1
    scores, labels = F.softmax(cls, dim=-1).max(-1)
    probs = masks.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], probs[keep]
    segment_map = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    segments, stuff = [], {}
    if cur_masks.shape[0] == 0:
        return segment_map, segments
    mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    current = 0
    for k in range(cur_classes.shape[0]):
        pred_class = cur_classes[k].item()
        isthing = bool(is_thing[pred_class])
        mask_area = (mask_ids == k).sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        mask = (mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:
                if pred_class in stuff:
                    segment_map[mask] = stuff[pred_class]
                    continue
                stuff[pred_class] = current + 1
            current += 1
            segment_map[mask] = current
            segments.append({"id": current, "category_id": pred_class, "isthing": isthing})
    return segment_map, segments


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_matches_per_query_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    num_queries, num_classes = 12, 5
    is_thing = torch.tensor([True, False, True, False, False])
    cls = torch.randn(num_queries, num_classes + 1, generator=generator) * 4
    # blob-like masks: low-res noise upsampled, so queries own regions and overlap partially
    masks = F.interpolate(torch.randn(1, num_queries, 4, 4, generator=generator) * 6, (24, 20), mode="bilinear")[0]
    expected_map, expected_info = reference_panoptic(cls, masks, is_thing, 0.3, 0.5)
    segment_map, info = panoptic_inference(cls, masks, is_thing, object_mask_threshold=0.3, overlap_threshold=0.5)
    assert len(expected_info) > 0
    assert torch.equal(segment_map, expected_map)
    assert [{k: s[k] for k in ("id", "category_id", "isthing")} for s in info] == expected_info
    for s in info:
        assert s["area"] == int((segment_map == s["id"]).sum())


# ---------------------------------------------------------------- instance


def test_instance_topk_over_queries_times_classes_and_mask_score():
    probs = torch.tensor(
        [
            [0.60, 0.30, 0.05, 0.05],  # query 0: class 0 (0.60) and class 1 (0.30)
            [0.10, 0.70, 0.15, 0.05],  # query 1: class 1 (0.70)
            [0.02, 0.03, 0.05, 0.90],  # query 2: mostly no-object
        ]
    )
    masks = torch.full((3, 8, 8), -1.0)
    masks[0, 2:5, 1:6] = 2.0
    masks[0, 4, 5] = 1.0
    masks[1, 0, 0] = 0.0  # logit exactly 0 is not in the binary mask -> empty mask
    result = instance_inference(probs.log(), masks, top_k=3)
    assert result["labels"].tolist() == [1, 0, 1]
    mask_score_0 = (14 * torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(1.0))) / (15 + 1e-6)
    torch.testing.assert_close(result["scores"][1], (0.60 * mask_score_0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["scores"][2], (0.30 * mask_score_0).float(), rtol=1e-5, atol=1e-6)
    assert float(result["scores"][0]) == 0.0  # empty mask -> mask score 0
    assert not result["masks"][0].any()
    assert torch.equal(result["masks"][1], masks[0] > 0) and torch.equal(result["masks"][2], masks[0] > 0)
    assert result["boxes"].tolist() == [[0, 0, 0, 0], [1, 2, 6, 5], [1, 2, 6, 5]]
    assert result["boxes"].dtype == torch.float32 and result["labels"].dtype == torch.int64
    # The original gives all-zero boxes; that is the mask_boxes=False option, everything else unchanged.
    reference = instance_inference(probs.log(), masks, top_k=3, mask_boxes=False)
    assert reference["boxes"].tolist() == [[0, 0, 0, 0]] * 3 and reference["boxes"].dtype == torch.float32
    assert torch.equal(reference["scores"], result["scores"]) and torch.equal(reference["masks"], result["masks"])


def test_instance_thing_restriction_and_top_k_cap():
    torch.manual_seed(1)
    cls, masks = torch.randn(4, NUM_CLASSES + 1), torch.randn(4, 6, 6)
    everything = instance_inference(cls, masks, top_k=100)
    assert everything["labels"].numel() == 4 * NUM_CLASSES
    things = instance_inference(cls, masks, is_thing=IS_THING, top_k=100)
    assert things["labels"].numel() == 4 * 2 and bool((things["labels"] != 2).all())
    # restriction is applied after the top-k, as in the original
    top = instance_inference(cls, masks, top_k=5)
    restricted = instance_inference(cls, masks, is_thing=IS_THING, top_k=5)
    assert restricted["labels"].numel() == int((top["labels"] != 2).sum())


def test_masks_to_boxes_exclusive_corners():
    masks = torch.zeros(2, 5, 7, dtype=torch.bool)
    masks[0, 1, 2] = True
    masks[0, 3, 5] = True
    assert masks_to_boxes(masks).tolist() == [[2, 1, 6, 4], [0, 0, 0, 0]]


# ---------------------------------------------------------------- batch


def test_batch_postprocess_matches_single_image_calls():
    torch.manual_seed(2)
    outputs = {"pred_logits": torch.randn(2, 6, NUM_CLASSES + 1) * 3, "pred_masks": torch.randn(2, 6, 8, 8) * 5}
    image_sizes, original_sizes = [(32, 20), (24, 32)], [(64, 40), (12, 16)]
    panoptic = batch_postprocess(outputs, image_sizes, original_sizes, "panoptic", IS_THING, object_mask_threshold=0.2)
    instance = batch_postprocess(outputs, image_sizes, original_sizes, "instance", IS_THING, top_k=7)
    semantic = batch_postprocess(outputs, image_sizes, original_sizes, "semantic", return_semantic_scores=True)
    for b in range(2):
        resized = resize_mask_logits(outputs["pred_masks"][b], (32, 32), image_sizes[b], original_sizes[b])
        seg, info = panoptic_inference(outputs["pred_logits"][b], resized, IS_THING, 0.2)
        assert torch.equal(panoptic[b][0], seg) and panoptic[b][1] == info
        assert panoptic[b][0].shape == original_sizes[b]
        single = instance_inference(outputs["pred_logits"][b], resized, IS_THING, 7)
        assert torch.equal(instance[b]["masks"], single["masks"]) and torch.equal(instance[b]["scores"], single["scores"])
        # semantic-only order: inference at the padded size, then crop + resize of the K-channel map
        upsampled = F.interpolate(outputs["pred_masks"][b][None], (32, 32), mode="bilinear")[0]
        expected = crop_and_resize(semantic_inference(outputs["pred_logits"][b], upsampled), image_sizes[b], original_sizes[b])
        torch.testing.assert_close(semantic[b], expected)
    labels = batch_postprocess(outputs, image_sizes, None, "semantic")
    assert labels[0].dtype == torch.int64 and labels[0].shape == image_sizes[0]


def test_batch_postprocess_accepts_output_objects_and_rejects_bad_input():
    class Output:
        pred_logits = torch.zeros(1, 2, NUM_CLASSES + 1)
        pred_masks = torch.zeros(1, 2, 4, 4)

    assert batch_postprocess(Output(), [(16, 16)], None, "semantic")[0].shape == (16, 16)
    with pytest.raises(ValueError, match="task"):
        batch_postprocess(Output(), [(16, 16)], None, "depth")
    with pytest.raises(ValueError, match="is_thing"):
        batch_postprocess(Output(), [(16, 16)], None, "panoptic")
    with pytest.raises(ValueError, match="batch of 1"):
        batch_postprocess(Output(), [(16, 16), (8, 8)], None, "semantic")
    with pytest.raises(ValueError, match="is_thing has 2 entries"):
        panoptic_inference(torch.zeros(2, NUM_CLASSES + 1), torch.zeros(2, 4, 4), [True, False])
    assert math.isfinite(float(semantic_inference(torch.zeros(2, 4), torch.zeros(2, 3, 3)).sum()))


# ---------------------------------------------------------------- semantic order (reference: maskformer_model.py)


def _order_case():
    """Query 0 is class A with mask logits [10, -2], query 1 class B with [0.5, 0.5], on a 1x2 grid resized to 1x3:
    the middle output pixel is the average of its two neighbours. Resizing logits first gives A there
    (sigmoid(4) = 0.982 > sigmoid(0.5) = 0.622); resizing the scores after gives B ((sigmoid(10) + sigmoid(-2)) / 2
    = 0.560 < 0.622)."""
    cls = class_logits([(0, 1.0 - 1e-6), (1, 1.0 - 1e-6)])
    masks = torch.tensor([[[10.0, -2.0]], [[0.5, 0.5]]])
    return {"pred_logits": cls[None], "pred_masks": masks[None]}


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("before", [True, False])
def test_semantic_order_known_answer(before):
    outputs = _order_case()
    kwargs = dict(padded_size=(1, 2), semantic_postprocess_before_inference=before)
    scores = batch_postprocess(outputs, [(1, 2)], [(1, 3)], "semantic", return_semantic_scores=True, **kwargs)[0]
    labels = batch_postprocess(outputs, [(1, 2)], [(1, 3)], "semantic", **kwargs)[0]
    middle_a = _sigmoid(4.0) if before else (_sigmoid(10.0) + _sigmoid(-2.0)) / 2
    expected = torch.tensor([[[_sigmoid(10.0), middle_a, _sigmoid(-2.0)]], [[_sigmoid(0.5)] * 3]])
    torch.testing.assert_close(scores[:2], expected, atol=1e-5, rtol=0)
    assert labels.tolist() == ([[0, 0, 1]] if before else [[0, 1, 1]])


def test_semantic_before_inference_equals_the_reference_order_on_random_logits():
    """The original with PANOPTIC_ON / INSTANCE_ON: logits upsampled to the padded size, cropped, resized to the
    output size, then sum_q softmax * sigmoid; written out here with plain torch calls."""
    torch.manual_seed(3)
    cls, masks = torch.randn(1, 6, NUM_CLASSES + 1) * 3, torch.randn(1, 6, 8, 10) * 4
    image_size, output_size = (27, 38), (41, 57)
    ours = batch_postprocess({"pred_logits": cls, "pred_masks": masks}, [image_size], [output_size], "semantic",
                             semantic_postprocess_before_inference=True, return_semantic_scores=True)[0]
    logits = F.interpolate(masks, size=(32, 40), mode="bilinear", align_corners=False)[:, :, :27, :38]
    logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)[0]
    expected = torch.einsum("qc,qhw->chw", cls[0].softmax(-1)[:, :-1], logits.sigmoid())
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    after = batch_postprocess({"pred_logits": cls, "pred_masks": masks}, [image_size], [output_size], "semantic",
                              return_semantic_scores=True)[0]
    assert (after - expected).abs().max() > 1e-3  # the other order is measurably different


def test_batch_postprocess_reads_padded_size_from_the_outputs():
    torch.manual_seed(4)
    masks, cls = torch.randn(1, 3, 8, 8), torch.randn(1, 3, NUM_CLASSES + 1)
    # padded_size says the network ran on 40x40 (not 4 x 8 = 32): the crop must use it.
    outputs = {"pred_logits": cls, "pred_masks": masks, "padded_size": (40, 40)}
    got = batch_postprocess(outputs, [(30, 35)], [(15, 20)], "instance", top_k=5)[0]
    expected = instance_inference(cls[0], resize_mask_logits(masks[0], (40, 40), (30, 35), (15, 20)), None, 5)
    assert torch.equal(got["masks"], expected["masks"])


# ---------------------------------------------------------------- which order, from the configuration


def test_presets_follow_the_reference_rule():
    from mask2former.config import PRESET_DIR, TestConfig, load_config

    for path in sorted(PRESET_DIR.glob("[a-z]*.yaml")):
        test = load_config(path.stem).test
        # The reference: SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE (never set in its configs) or PANOPTIC_ON or
        # INSTANCE_ON; its panoptic and instance configs turn those on, its semantic configs do not.
        assert test.semantic_postprocess_before_inference is (test.task != "semantic"), path.stem
    assert TestConfig(task="panoptic").semantic_before_inference() is True
    assert TestConfig(task="instance").semantic_before_inference() is True
    assert TestConfig(task="semantic").semantic_before_inference() is False
    assert TestConfig(task="panoptic", semantic_postprocess_before_inference=False).semantic_before_inference() is False


def test_predictor_uses_the_order_the_model_was_built_with(tmp_path):
    import dataclasses

    from conftest import tiny_swin_config
    from mask2former.config import load_config
    from mask2former.inference.predictor import Predictor, resize_shortest_edge
    from mask2former.modeling.model import Mask2Former
    from mask2former.modeling.build import build_model

    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for preset in ("coco_panoptic_r50", "ade20k_semantic_r50"):
        config = load_config(preset)
        config = dataclasses.replace(config, model=tiny_swin_config())
        torch.manual_seed(0)
        model = build_model(config).eval()
        before = preset.startswith("coco")
        assert model.config.semantic_postprocess_before_inference is before
        model.save_pretrained(tmp_path / preset)  # the checkpoint carries it
        loaded = Mask2Former.from_pretrained(tmp_path / preset)
        assert loaded.config.semantic_postprocess_before_inference is before
        # 45x70 is run at 64x100 (padded 64x128); the result is at 45x70, so the two orders differ.
        got = Predictor(loaded, task="semantic", min_size=64, max_size=1000)(image)
        with torch.no_grad():
            resized = resize_shortest_edge(image, 64, 1000)
            outputs = loaded(loaded.normalize(resized[None]), aux_outputs=False)
        assert outputs.image_size == (64, 100) and outputs.padded_size == (64, 128)
        scores = {
            order: batch_postprocess(outputs, [(64, 100)], [(45, 70)], "semantic", return_semantic_scores=True,
                                     semantic_postprocess_before_inference=order)[0]
            for order in (True, False)
        }
        assert torch.equal(got, scores[before].argmax(0))
        assert (scores[True] - scores[False]).abs().max() > 1e-4
    # An explicit argument overrides the model's choice.
    forced = Predictor(loaded, task="semantic", min_size=64, max_size=1000, semantic_postprocess_before_inference=True)
    assert forced.postprocess_options["semantic_postprocess_before_inference"] is True
