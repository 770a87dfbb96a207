"""Label placement on crowded overlays: no two labels overlap, every label lies on the picture, a label that fits
nowhere is listed as left off, and labels sit inside their segment (largest component) when there is room."""

import itertools

import numpy as np
import pytest
import torch

from mask2former.data.label_space import LabelSpace
from mask2former.label_layout import boxes_intersect, layout_labels
from mask2former.viz import display_scale, draw_instances, draw_panoptic, draw_semantic

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
         "gravel", "brick", "grass"]
LABELS = LabelSpace(NAMES, [True] * 10 + [False] * 3)


def crowded_scene(seed: int, height: int, width: int, cells: int):
    """A segment map tiled with ``cells`` x ``cells`` touching rectangles of random sizes (many of a few pixels),
    one segment split into two components, and some void."""
    generator = np.random.default_rng(seed)
    cuts_y = np.unique(np.r_[0, np.sort(generator.choice(np.arange(1, height), cells - 1, replace=False)), height])
    cuts_x = np.unique(np.r_[0, np.sort(generator.choice(np.arange(1, width), cells - 1, replace=False)), width])
    segment_map = np.zeros((height, width), dtype=np.int32)
    next_id = 1
    for (y0, y1), (x0, x1) in itertools.product(zip(cuts_y[:-1], cuts_y[1:]), zip(cuts_x[:-1], cuts_x[1:])):
        if generator.random() < 0.1:
            continue  # void
        segment_map[y0:y1, x0:x1] = next_id
        next_id += 1
    # segment 1 gets a second, smaller component far away
    segment_map[height - 2:, width - 2:] = 1
    infos = [{"id": i, "category_id": int(generator.integers(len(NAMES))), "isthing": True,
              "score": float(generator.uniform(0.5, 1.0)), "area": int((segment_map == i).sum())}
             for i in range(1, next_id)]
    image = torch.from_numpy(generator.integers(0, 256, (3, height, width), dtype=np.uint8))
    return image, segment_map, infos


def check_layout(layout, picture_size, expected_texts):
    boxes = [label.box for label in layout.placed]
    for a, b in itertools.combinations(boxes, 2):
        assert not boxes_intersect(a, b), (a, b)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= picture_size[0] and 0 <= y0 < y1 <= picture_size[1]
    placed = {label.index for label in layout.placed}
    left_off = {index for index, _ in layout.left_off}
    assert not placed & left_off
    assert placed | left_off == set(expected_texts)
    assert {label.index: label.text for label in layout.placed} == {i: expected_texts[i] for i in placed}
    for label in layout.placed:  # a leader line crosses no other label
        if label.leader:
            start, end = np.asarray(label.anchor, float), np.asarray(label.leader_end(), float)
            for t in np.linspace(0, 1, 50):
                x, y = start + t * (end - start)
                assert not any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in boxes if b != label.box)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crowded_panoptic_overlay_places_labels_apart_on_the_picture(seed):
    image, segment_map, infos = crowded_scene(seed, 96, 128, cells=7)
    assert len(infos) >= 20
    picture, layout = draw_panoptic(image, segment_map, infos, LABELS, return_layout=True)
    scale = display_scale(128, 96)
    assert scale == 4 and picture.width > 128 * scale  # the legend panel is beside the picture
    texts = {k: f"{NAMES[info['category_id']]} {info['score']:.2f}" for k, info in enumerate(infos)}
    check_layout(layout, (128 * scale, 96 * scale), texts)
    assert len(layout.placed) >= 15
    assert any(label.leader for label in layout.placed)  # some had to go outside their segment
    # what is drawn is the layout: each label box is outlined in its class colour, with white text inside
    pixels = np.asarray(picture)
    for label in layout.placed:
        x0, y0, x1, y1 = label.box
        color = LABELS.colors[infos[label.index]["category_id"]]
        assert tuple(pixels[(y0 + y1) // 2, x0]) == tuple(color)
        assert (pixels[y0 + 1:y1 - 1, x0 + 1:x1 - 1] > 200).all(-1).any()


def test_a_label_that_fits_nowhere_is_left_off_and_listed():
    # 100 segments in a 40x40 image: far more labels than room for them
    image, segment_map, infos = crowded_scene(3, 40, 40, cells=11)
    picture, layout = draw_panoptic(image, segment_map, infos, LABELS, return_layout=True, legend=False)
    assert picture.size == (520, 520)
    texts = {k: f"{NAMES[info['category_id']]} {info['score']:.2f}" for k, info in enumerate(infos)}
    check_layout(layout, picture.size, texts)
    assert layout.left_off and layout.placed
    # a label wider than the picture is left off too
    wide = layout_labels([np.ones((4, 4), bool)], ["x" * 99], [(900, 14)], 1, (4, 4))
    assert wide.placed == [] and wide.left_off == [(0, "x" * 99)]


def test_overlapping_instances_and_semantic_classes():
    image, segment_map, infos = crowded_scene(4, 80, 80, cells=6)
    masks = torch.stack([torch.from_numpy(segment_map == info["id"]) for info in infos])
    masks[1:] |= torch.roll(masks[:-1], shifts=3, dims=2)  # neighbours overlap by a few pixels
    instances = {"masks": masks, "labels": torch.tensor([i["category_id"] for i in infos]),
                 "scores": torch.tensor([i["score"] for i in infos])}
    picture, layout = draw_instances(image, instances, LABELS, return_layout=True, legend=False)
    order = np.argsort(instances["scores"].numpy(), kind="stable")  # drawn lowest score first
    texts = {k: f"{NAMES[infos[i]['category_id']]} {infos[i]['score']:.2f}" for k, i in enumerate(order)}
    check_layout(layout, picture.size, texts)
    semantic = torch.from_numpy(np.where(segment_map > 0, segment_map % len(NAMES), 255))
    picture, layout = draw_semantic(image, semantic, LABELS, return_layout=True, legend=False)
    present = [int(c) for c in np.unique(semantic.numpy()) if c != 255]
    check_layout(layout, picture.size, {k: NAMES[c] for k, c in enumerate(present)})


def test_labels_go_inside_the_largest_component_when_there_is_room():
    mask = np.zeros((60, 80), bool)
    mask[5:10, 5:10] = True  # small component
    mask[20:58, 20:78] = True  # large component
    other = np.zeros_like(mask)
    other[0:15, 40:80] = True
    layout = layout_labels([mask, other], ["Coat 0.90", "Dress 0.85"], [(40, 12), (40, 12)], 1, (80, 60))
    by_index = {label.index: label for label in layout.placed}
    assert not by_index[0].leader and not by_index[1].leader
    x0, y0, x1, y1 = by_index[0].box
    assert mask[y0:y1, x0:x1].all() and y0 >= 20  # wholly on the large component
    x0, y0, x1, y1 = by_index[1].box
    assert other[y0:y1, x0:x1].all()
    # the small segment's label needs the large one's room: it goes outside with a leader line
    small = np.zeros_like(mask)
    small[30:34, 40:44] = True
    big = np.ones_like(mask) & ~small
    layout = layout_labels([small, big], ["Sneaker 0.98", "brick 1.00"], [(50, 14), (50, 14)], 1, (80, 60))
    check_layout(layout, (80, 60), {0: "Sneaker 0.98", 1: "brick 1.00"})
    first = {label.index: label for label in layout.placed}[0]
    assert not first.leader  # smallest first: it takes its own place, covering the large one around it
    assert small[first.anchor[1], first.anchor[0]]


def test_small_images_are_drawn_larger_and_large_ones_at_their_size():
    assert display_scale(64, 64) == 8 and display_scale(256, 256) == 2 and display_scale(300, 200) == 2
    assert display_scale(500, 400) == 1 and display_scale(2000, 1000) == 1 and display_scale(64, 64, 0) == 1
    segment_map = np.zeros((64, 64), np.int32)
    segment_map[8:40, 8:40] = 1
    info = [{"id": 1, "category_id": 3, "isthing": True, "score": 0.9, "area": 1024}]
    image = torch.full((3, 64, 64), 100, dtype=torch.uint8)
    picture = draw_panoptic(image, segment_map, info, LABELS, legend=False)
    assert picture.size == (512, 512)
    pixels = np.asarray(picture)
    # masks are repeated pixel by pixel: the segment covers [64, 320) on the canvas, outlined in its colour
    assert tuple(pixels[100, 64]) == tuple(LABELS.colors[3]) and tuple(pixels[100, 63]) == (100, 100, 100)
    assert tuple(pixels[319, 200]) == tuple(LABELS.colors[3]) and tuple(pixels[320, 200]) == (100, 100, 100)
