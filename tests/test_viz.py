"""Overlays: blended class colours, borders, labels, legend, side-by-side PNG."""

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.data.label_space import LabelSpace, default_colors
from mask2former.viz import class_color, compare, draw_instances, draw_panoptic, draw_semantic, side_by_side, visualize

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
LABELS = LabelSpace(["shirt", "bag", "grass"], [True, True, False], colors=[RED, GREEN, BLUE])
GRAY = 100
H, W = 40, 60


def gray_image():
    return torch.full((3, H, W), GRAY, dtype=torch.uint8)


def blend(color, alpha=0.5):
    return tuple(int(np.round((1 - alpha) * GRAY + alpha * c)) for c in color)


def pixel(image, x, y):
    return tuple(image.getpixel((x, y)))


def test_semantic_overlay_blends_outlines_labels_and_skips_ignore():
    semantic = torch.full((H, W), 255)
    semantic[:, :30] = 2
    out = draw_semantic(gray_image(), semantic, LABELS, legend=False, display_size=0)
    assert out.size == (W, H)
    assert pixel(out, 5, 35) == blend(BLUE)  # inside, away from the label at the centroid
    assert pixel(out, 0, 20) == BLUE and pixel(out, 29, 35) == BLUE  # image edge and region edge are borders
    assert pixel(out, 45, 35) == (GRAY, GRAY, GRAY)  # ignore stays as the image
    region = np.asarray(out)[:, :30]
    assert ((region == 0).all(-1)).any() and ((region > 200).all(-1)).any()  # black label box with (anti-aliased) white text


def test_legend_lists_classes_shown_with_their_colour():
    semantic = torch.zeros((H, W), dtype=torch.long)
    semantic[:, 30:] = 2
    out = draw_semantic(gray_image(), semantic, LABELS)
    assert out.width > W
    legend = np.asarray(out)[:, W:]
    assert (legend == RED).all(-1).any() and (legend == BLUE).all(-1).any()
    assert not (legend == GREEN).all(-1).any()  # "bag" is not in the picture


def test_colours_are_stable_per_class():
    assert class_color(LABELS, 1) == GREEN
    class Plain:  # a LabelSpace-like object without colours falls back to LabelSpace's defaults
        names = ["a", "b", "c"]
    assert class_color(Plain(), 2) == default_colors(3)[2] == class_color(Plain(), 2)
    with pytest.raises(ValueError, match="class id 3"):
        class_color(Plain(), 3)


def test_instances_below_threshold_are_not_drawn():
    masks = torch.zeros((2, H, W), dtype=torch.bool)
    masks[0, 0:20, 0:20] = True
    masks[1, 20:40, 30:60] = True
    instances = {"masks": masks, "labels": torch.tensor([0, 1]), "scores": torch.tensor([0.9, 0.3]), "boxes": torch.zeros(2, 4)}
    out = draw_instances(gray_image(), instances, LABELS, score_threshold=0.5, legend=False, display_size=0)
    assert pixel(out, 2, 17) == blend(RED)
    assert pixel(out, 0, 0) == RED
    assert pixel(out, 35, 38) == (GRAY, GRAY, GRAY)
    everything = visualize(gray_image(), instances, "instance", LABELS, score_threshold=0.0, legend=False, display_size=0)
    assert pixel(everything, 33, 38) == blend(GREEN)


def test_panoptic_overlay_and_void():
    segment_map = torch.zeros((H, W), dtype=torch.int32)
    segment_map[:10] = 4
    segment_map[20:, 30:] = 9
    info = [{"id": 4, "category_id": 2, "isthing": False, "score": 0.9, "area": 600}, {"id": 9, "category_id": 0, "isthing": True, "score": 0.95, "area": 600}]
    out = draw_panoptic(gray_image(), segment_map, info, LABELS, legend=False, display_size=0)
    assert pixel(out, 2, 2) == blend(BLUE) and pixel(out, 59, 39) == RED and pixel(out, 10, 15) == (GRAY, GRAY, GRAY)
    with pytest.raises(ValueError, match="segment map size"):
        draw_panoptic(gray_image(), segment_map[:5], info, LABELS)


def test_compare_writes_side_by_side_png(tmp_path):
    masks = torch.zeros((2, H, W), dtype=torch.bool)
    masks[0, :, :20] = True
    masks[1, :, 20:] = True
    sample = {"image": gray_image(), "labels": torch.tensor([0, 2]), "masks": masks, "iscrowd": torch.tensor([False, False])}
    prediction = (masks[1].int() * 3, [{"id": 3, "category_id": 2, "isthing": False, "score": 0.9, "area": 1600}])
    path = tmp_path / "vis" / "cmp.png"
    out = compare(sample, prediction, "panoptic", LABELS, path=path, legend=False, display_size=0)
    saved = Image.open(path)
    assert saved.format == "PNG" and saved.size == out.size
    assert out.width == 2 * W + 8 and out.height > H  # plus the title row
    top = out.height - H
    assert pixel(out, 5, top + 30) == blend(RED)  # ground truth: shirt on the left
    assert pixel(out, W + 8 + 5, top + 30) == (GRAY, GRAY, GRAY)  # prediction: nothing there
    assert pixel(out, W + 8 + 50, top + 35) == blend(BLUE)
    both = side_by_side(Image.new("RGB", (10, 10)), Image.new("RGB", (20, 5)), titles=None, gap=2)
    assert both.size == (32, 10)


def test_instance_ground_truth_shows_things_only():
    masks = torch.zeros((2, H, W), dtype=torch.bool)
    masks[0, :, :20] = True
    masks[1, :, 20:] = True  # grass: stuff, not an instance
    sample = {"image": gray_image(), "labels": torch.tensor([0, 2]), "masks": masks, "iscrowd": torch.tensor([True, False])}
    empty = {"masks": torch.zeros((0, H, W), dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    out = compare(sample, empty, "instance", LABELS, legend=False, display_size=0)
    top = out.height - H
    assert pixel(out, 3, top + 35) == blend(RED) and pixel(out, 50, top + 35) == (GRAY, GRAY, GRAY)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_pass_overlay_of_disjoint_segments_equals_the_per_segment_overlay(seed):
    # Random blocky segment maps over a random picture: the one-pass blend and outlines (panoptic and semantic
    # draw with them) must give the pixels the per-segment drawing (used for overlapping instances) gives.
    from mask2former.viz import _overlay, to_pil_image

    generator = torch.Generator().manual_seed(seed)
    image = to_pil_image(torch.randint(0, 256, (3, H, W), generator=generator, dtype=torch.uint8))
    coarse = torch.randint(0, 6, (H // 4 + 1, W // 4 + 1), generator=generator)
    segment_index = coarse.repeat_interleave(4, 0).repeat_interleave(4, 1)[:H, :W].numpy()
    colors = [tuple(int(v) for v in torch.randint(0, 256, (3,), generator=generator)) for _ in range(5)]
    segments = [(segment_index == k + 1, colors[k], None) for k in range(5)]
    for alpha in (0.5, 0.3, 1.0):
        for display_size in (0, 512):  # the image's size, and drawn 9x larger
            expected = np.asarray(_overlay(image, segments, alpha, None, display_size=display_size)[0])
            actual = np.asarray(_overlay(image, segments, alpha, None, segment_index=segment_index,
                                         display_size=display_size)[0])
            assert np.array_equal(actual, expected)
