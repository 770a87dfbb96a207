import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.data.transforms import (
    Compose,
    ColorJitter,
    LargeScaleJitter,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    eval_transforms,
    lsj_train_transforms,
    semantic_train_transforms,
    shortest_edge_size,
)


def coordinate_sample(height=40, width=60):
    """Image channels encode (row, col); semantic encodes the cell; masks = 4 quadrant segments."""
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    image = torch.stack([rows, cols, (rows + cols) % 256]).to(torch.uint8)
    quadrant = (rows >= height // 2).long() * 2 + (cols >= width // 2).long()
    masks = torch.stack([quadrant == q for q in range(4)])
    labels = torch.tensor([3, 1, 4, 0])
    semantic = labels[quadrant]
    return {"image": image, "labels": labels, "masks": masks, "iscrowd": torch.tensor([False, True, False, False]),
            "semantic": semantic, "image_id": 7, "file_name": "x", "orig_size": (height, width)}


def assert_consistent(sample):
    """Every mask pixel carries its label in the semantic map; shapes agree."""
    height, width = sample["image"].shape[-2:]
    assert sample["image"].dtype == torch.uint8
    assert tuple(sample["masks"].shape[1:]) == (height, width) and tuple(sample["semantic"].shape) == (height, width)
    assert len(sample["labels"]) == len(sample["masks"]) == len(sample["iscrowd"])
    for label, mask in zip(sample["labels"], sample["masks"]):
        assert bool((sample["semantic"][mask] == label).all())


def test_shortest_edge_size_by_hand():
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(100, 1000, 200, 1000) == (100, 1000)  # long side capped
    assert shortest_edge_size(640, 480, 240, 10_000) == (320, 240)
    # detectron2: short side exactly ``size``, long side ``scale * w``; both rescaled by max_size / longest
    assert shortest_edge_size(333, 500, 512, 2048) == (512, int(512 / 333 * 500 + 0.5))
    assert shortest_edge_size(300, 1000, 400, 1000) == (300, 1000)


def test_resize_shortest_edge_moves_everything_together():
    sample = coordinate_sample(40, 60)
    out = ResizeShortestEdge(20)(sample)
    assert tuple(out["image"].shape) == (3, 20, 30)
    assert_consistent(out)
    assert out["labels"].tolist() == [3, 1, 4, 0] and out["orig_size"] == (40, 60)
    # nearest (pixel centre) for labels: output pixel (r, c) samples input (2r + 1, 2c + 1) -> quadrant unchanged
    assert out["semantic"][9, 14].item() == 3 and out["semantic"][10, 15].item() == 0
    # image: PIL's antialiased bilinear, exactly (detectron2 resizes uint8 images with PIL)
    reference = np.asarray(Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).resize((30, 20), Image.BILINEAR))
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), reference)


def test_resize_range_style_and_choice():
    torch.manual_seed(0)
    sizes = {min(ResizeShortestEdge((10, 14), sample_style="range")(coordinate_sample())["image"].shape[-2:])
             for _ in range(40)}
    assert sizes == set(range(10, 15))
    sizes = {min(ResizeShortestEdge((10, 20))(coordinate_sample())["image"].shape[-2:]) for _ in range(20)}
    assert sizes == {10, 20}


def test_random_crop_keeps_alignment():
    torch.manual_seed(1)
    for _ in range(10):
        out = RandomCrop((16, 24))(coordinate_sample())
        assert tuple(out["image"].shape) == (3, 16, 24)
        top, left = out["image"][0, 0, 0].item(), out["image"][1, 0, 0].item()
        reference = coordinate_sample()
        assert torch.equal(out["image"], reference["image"][:, top:top + 16, left:left + 24])
        assert torch.equal(out["semantic"], reference["semantic"][top:top + 16, left:left + 24])
        assert_consistent(out)


def test_random_crop_smaller_image_kept_whole():
    out = RandomCrop(100)(coordinate_sample(40, 60))
    assert tuple(out["image"].shape) == (3, 40, 60)


def banded_sample():
    """100x100: class 1 in rows < 50, class 0 below; almost every 20x20 crop holds one class only."""
    sample = coordinate_sample(100, 100)
    semantic = torch.zeros(100, 100, dtype=torch.int64)
    semantic[:50] = 1
    sample.update(semantic=semantic, labels=torch.tensor([1, 0]), masks=torch.stack([semantic == 1, semantic == 0]),
                  iscrowd=torch.tensor([False, False]))
    return sample


def crop_satisfies(out, max_area):
    _, counts = torch.unique(out["semantic"], return_counts=True)
    return len(counts) > 1 and counts.max().item() < max_area * counts.sum().item()


def test_category_area_constraint():
    runs, sample = 60, banded_sample()  # transforms return new dicts and never modify their input
    torch.manual_seed(0)
    constrained = sum(crop_satisfies(RandomCrop(20, single_category_max_area=0.75)(sample), 0.75) for _ in range(runs))
    torch.manual_seed(0)
    plain = sum(crop_satisfies(RandomCrop(20)(sample), 0.75) for _ in range(runs))
    # one try succeeds with probability 9/81; ten tries with about 0.69
    assert plain / runs < 0.25 and constrained / runs > 0.5


def test_category_area_constraint_gives_up_after_max_tries():
    sample = coordinate_sample()
    sample["semantic"] = torch.zeros_like(sample["semantic"])
    out = RandomCrop(10, single_category_max_area=0.5)(sample)
    assert tuple(out["image"].shape) == (3, 10, 10)


def corner_object_sample():
    sample = coordinate_sample(10, 10)
    small = torch.zeros(10, 10, dtype=torch.bool)
    small[0:2, 0:2] = True
    background = ~small
    semantic = torch.where(small, 5, 2)
    sample.update(labels=torch.tensor([5, 2]), masks=torch.stack([small, background]),
                  iscrowd=torch.tensor([True, False]), semantic=semantic)
    return sample


def test_empty_masks_after_crop_dropped_or_kept():
    dropped_once = kept_empty_once = False
    for seed in range(20):
        torch.manual_seed(seed)
        dropped = RandomCrop(5)(corner_object_sample())
        torch.manual_seed(seed)
        kept = RandomCrop(5, drop_empty=False)(corner_object_sample())
        assert torch.equal(dropped["image"], kept["image"])
        assert bool(dropped["masks"].flatten(1).any(1).all())  # never an empty mask when dropping
        assert len(kept["labels"]) == 2
        if len(dropped["labels"]) == 1:
            dropped_once = True
            assert dropped["labels"].tolist() == [2] and dropped["iscrowd"].tolist() == [False]
        kept_empty_once |= not bool(kept["masks"][0].any())
        assert_consistent(dropped)
    assert dropped_once and kept_empty_once


def test_lsj_fixed_scale_pads_by_hand():
    sample = coordinate_sample(100, 200)
    out = LargeScaleJitter(image_size=64, min_scale=0.5, max_scale=0.5)(sample)
    # target 32 -> scale min(32/100, 32/200) = 0.16 -> 16x32, no crop, padded to 64x64 with 128 (FixedSizeCrop)
    assert tuple(out["image"].shape) == (3, 64, 64)
    assert bool((out["image"][:, 16:, :] == 128).all()) and bool((out["image"][:, :, 32:] == 128).all())
    assert bool((out["semantic"][16:, :] == 255).all()) and bool((out["semantic"][:, 32:] == 255).all())
    assert not out["masks"][:, 16:, :].any() and not out["masks"][:, :, 32:].any()
    assert bool((out["semantic"][:16, :32] != 255).all())
    assert_consistent(out)


def test_lsj_large_scale_crops_to_square():
    torch.manual_seed(3)
    out = LargeScaleJitter(image_size=64, min_scale=2.0, max_scale=2.0)(coordinate_sample(100, 200))
    # target 128 -> scale 0.64 -> 64x128, then a 64x64 crop: no padding
    assert tuple(out["image"].shape) == (3, 64, 64) and bool((out["semantic"] != 255).all())
    assert_consistent(out)


def test_lsj_empty_masks_policy():
    seen_drop = False
    for seed in range(15):
        torch.manual_seed(seed)
        dropped = LargeScaleJitter(image_size=8, min_scale=1.5, max_scale=2.0)(corner_object_sample())
        torch.manual_seed(seed)
        kept = LargeScaleJitter(image_size=8, min_scale=1.5, max_scale=2.0, drop_empty=False)(corner_object_sample())
        assert len(kept["labels"]) == 2 and bool(dropped["masks"].flatten(1).any(1).all())
        seen_drop |= len(dropped["labels"]) == 1
    assert seen_drop


def test_horizontal_flip():
    sample = coordinate_sample()
    flipped = RandomHorizontalFlip(p=1.0)(sample)
    assert torch.equal(flipped["image"], sample["image"].flip(-1))
    assert torch.equal(flipped["masks"], sample["masks"].flip(-1))
    assert torch.equal(flipped["semantic"], sample["semantic"].flip(-1))
    assert_consistent(flipped)
    assert RandomHorizontalFlip(p=0.0)(sample) is sample


def test_color_jitter_touches_only_the_image():
    torch.manual_seed(0)
    sample = coordinate_sample()
    out = ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2)(sample)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == sample["image"].shape
    assert not torch.equal(out["image"], sample["image"])
    for key in ("labels", "masks", "semantic", "iscrowd"):
        assert torch.equal(out[key], sample[key])


def test_recipes():
    torch.manual_seed(0)
    out = semantic_train_transforms(crop_size=32)(coordinate_sample(40, 60))
    assert max(out["image"].shape[-2:]) <= 32
    assert_consistent(out)
    out = lsj_train_transforms(image_size=48)(coordinate_sample(40, 60))
    assert tuple(out["image"].shape) == (3, 48, 48)
    out = eval_transforms(20)(coordinate_sample(40, 60))
    assert tuple(out["image"].shape) == (3, 20, 30)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample_style"):
        ResizeShortestEdge(10, sample_style="other")
    with pytest.raises(ValueError, match="single_category_max_area"):
        RandomCrop(10, single_category_max_area=0.0)
    with pytest.raises(ValueError, match="min_scale"):
        LargeScaleJitter(min_scale=2.0, max_scale=1.0)


def test_sample_without_segments_passes_through_geometry():
    sample = coordinate_sample(20, 30)
    sample.update(labels=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 20, 30, dtype=torch.bool),
                  iscrowd=torch.zeros(0, dtype=torch.bool), semantic=torch.full((20, 30), 255))
    torch.manual_seed(0)
    out = Compose([ResizeShortestEdge(10), RandomCrop(8), RandomHorizontalFlip(1.0),
                   LargeScaleJitter(image_size=16)])(sample)
    assert tuple(out["masks"].shape) == (0, 16, 16) and out["labels"].shape == (0,)
    assert bool((out["semantic"] == 255).all())
