"""Augmentation and test-time resize against detectron2/Mask2Former's definitions: hand-computed pixels, forced
random draws, PIL (the library detectron2 resizes with) and OpenCV (the library its SSD colour augmentation uses)."""

import random

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from skimage import data as skdata

from mask2former.config import load_config
from mask2former.data import transforms as T
from mask2former.data.color import ColorAugSSD, hsv_to_rgb, rgb_to_hsv
from mask2former.inference.predictor import resize_shortest_edge
from mask2former.data.build import build_train_transforms


def astronaut() -> torch.Tensor:
    return torch.from_numpy(skdata.astronaut().copy()).permute(2, 0, 1).contiguous()  # 512x512 RGB photo


def pil_resize(image: torch.Tensor, height: int, width: int, resample=Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width, height), resample))


def sample_of(image: torch.Tensor, semantic: torch.Tensor, labels, masks) -> dict:
    return {"image": image, "semantic": semantic, "labels": torch.tensor(labels), "masks": masks,
            "iscrowd": torch.zeros(len(labels), dtype=torch.bool), "image_id": 0, "file_name": "x",
            "orig_size": tuple(image.shape[-2:])}


# ------------------------------------------------------------------------------------------------- resizes
@pytest.mark.parametrize("size", [(300, 300), (200, 357), (800, 800), (731, 1000)])  # shrink and enlarge
def test_image_resize_is_pil_bilinear_exactly(size):
    image = astronaut()[:, :, :457]  # non-square photo crop
    out = T.resize_image(image, *size)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), pil_resize(image, *size))


@pytest.mark.parametrize("min_size,max_size", [(256, 2048), (800, 1333), (1024, 600)])
def test_predictor_resize_is_detectron2_resize_shortest_edge(min_size, max_size):
    image = astronaut()[:, :400, :]  # 400x512
    out = resize_shortest_edge(image, min_size, max_size)
    height, width = T.shortest_edge_size(400, 512, min_size, max_size)
    assert tuple(out.shape[-2:]) == (height, width)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), pil_resize(image, height, width))
    sample = sample_of(image, torch.zeros(400, 512, dtype=torch.long), [0], torch.ones(1, 400, 512, dtype=torch.bool))
    assert torch.equal(T.eval_transforms(min_size, max_size)(sample)["image"], out)


@pytest.mark.parametrize("kind", ["pil", "torch"])
def test_label_resize_is_the_libraries_nearest(kind):
    rng = np.random.default_rng(0)
    for _ in range(30):
        height, width = (int(v) for v in rng.integers(1, 120, 2))
        new_height, new_width = (int(v) for v in rng.integers(1, 200, 2))
        labels = rng.integers(0, 256, (height, width)).astype(np.uint8)
        if kind == "pil":  # detectron2 on uint8 label images (panoptic PNG)
            reference = np.asarray(Image.fromarray(labels).resize((new_width, new_height), Image.NEAREST))
        else:  # detectron2 on the float64 semantic map of the semantic mapper
            reference = nnf.interpolate(torch.from_numpy(labels).double()[None, None], (new_height, new_width),
                                        mode="nearest")[0, 0].numpy().astype(np.uint8)
        ours = T.resize_labels(torch.from_numpy(labels).long(), new_height, new_width, kind)
        assert np.array_equal(ours.numpy(), reference), (height, width, new_height, new_width)
    masks = torch.from_numpy(rng.integers(0, 2, (3, 17, 23)).astype(bool))
    stacked = T.resize_labels(masks, 40, 9, kind)
    assert stacked.dtype == torch.bool and all(torch.equal(stacked[i], T.resize_labels(masks[i], 40, 9, kind))
                                               for i in range(3))


def test_semantic_recipe_resizes_labels_like_the_semantic_mapper():
    image = astronaut()[:, :60, :90]
    semantic = torch.from_numpy(np.random.default_rng(1).integers(0, 5, (60, 90)))
    sample = sample_of(image, semantic, [0, 1, 2, 3, 4], torch.stack([semantic == c for c in range(5)]))
    out = T.ResizeShortestEdge(37, label_resize="torch")(sample)
    reference = nnf.interpolate(semantic.double()[None, None], tuple(out["semantic"].shape), mode="nearest")[0, 0]
    assert torch.equal(out["semantic"], reference.long())
    assert all(torch.equal(mask, out["semantic"] == label) for label, mask in zip(out["labels"], out["masks"]))


# ------------------------------------------------------------------------------------------------- LSJ
def forced_uniform(monkeypatch, values):
    calls = []

    def fake(low, high):
        calls.append((low, high))
        return low + (high - low) * values[len(calls) - 1]
    monkeypatch.setattr(T, "_uniform", fake)
    return calls


def test_lsj_one_shared_offset_draw(monkeypatch):
    image = astronaut()[:, :300, :]  # 300x512
    semantic = torch.zeros(300, 512, dtype=torch.long)
    sample = sample_of(image, semantic, [0], torch.ones(1, 300, 512, dtype=torch.bool))
    # scale u=1 -> 2.0 * 128 = 256 -> factor min(256/300, 256/512) = 0.5 -> 150x256; offset u = 0.3
    calls = forced_uniform(monkeypatch, [1.0, 0.3])
    out = T.LargeScaleJitter(image_size=128, min_scale=0.1, max_scale=2.0)(sample)
    assert calls == [(0.1, 2.0), (0.0, 1.0)]  # exactly one draw for the offset
    top, left = round((150 - 128) * 0.3), round((256 - 128) * 0.3)  # 7 and 38: the same u on both axes
    resized = T.resize_image(image, 150, 256)
    assert torch.equal(out["image"], resized[:, top:top + 128, left:left + 128])


def corner_sample():
    """20x20: label 5 in the top-left 4x4 corner, label 2 elsewhere."""
    image = astronaut()[:, :20, :20]
    small = torch.zeros(20, 20, dtype=torch.bool)
    small[:4, :4] = True
    return sample_of(image, torch.where(small, 5, 2), [5, 2], torch.stack([small, ~small]))


def test_lsj_empty_segments_kept_for_panoptic_dropped_for_instances(monkeypatch):
    # scale 2.0 * 10 -> 20x20 (no resize), offset u = 1 -> crop rows/cols 10..19: the corner object disappears
    forced_uniform(monkeypatch, [1.0, 1.0, 1.0, 1.0])
    panoptic = T.LargeScaleJitter(image_size=10, min_scale=2.0, max_scale=2.0, drop_empty=False)(corner_sample())
    instance = T.LargeScaleJitter(image_size=10, min_scale=2.0, max_scale=2.0, drop_empty=True)(corner_sample())
    assert panoptic["labels"].tolist() == [5, 2] and not panoptic["masks"][0].any() and panoptic["masks"][1].all()
    assert instance["labels"].tolist() == [2] and instance["masks"].shape == (1, 10, 10)


def test_lsj_pads_image_with_128_and_labels_with_ignore(monkeypatch):
    forced_uniform(monkeypatch, [0.0, 0.5])  # scale 0.5 * 64 = 32 -> 20x20 -> 32x32, padded to 64
    out = T.LargeScaleJitter(image_size=64, min_scale=0.5, max_scale=1.0)(corner_sample())
    assert bool((out["image"][:, 32:] == 128).all()) and bool((out["image"][:, :, 32:] == 128).all())
    assert bool((out["semantic"][32:] == 255).all()) and not out["masks"][:, :, 32:].any()
    assert torch.equal(out["image"][:, :32, :32], T.resize_image(corner_sample()["image"], 32, 32))


# ------------------------------------------------------------------------------------------------- semantic recipe
def test_short_edge_choices_are_the_reference_lists():
    for base in (512, 640, 1024):
        assert T.short_edge_choices(base, 0.5, 2.0) == [int(x * 0.1 * base) for x in range(5, 21)]
    assert T.short_edge_choices(512, 0.5, 2.0)[:3] == [256, 307, 358]


def test_category_area_crop_draws_at_most_max_tries_windows(monkeypatch):
    sample = corner_sample()
    sample["semantic"] = torch.zeros(20, 20, dtype=torch.long)  # never satisfiable
    crop = T.RandomCrop(8, single_category_max_area=0.5)
    drawn = []
    original = crop._window
    monkeypatch.setattr(crop, "_window", lambda h, w: drawn.append(1) or original(h, w))
    crop(sample)
    assert len(drawn) == 10  # RandomCrop_CategoryAreaConstraint: 10 tries, the last one kept


def test_pad_to_crop_pads_128_and_ignore():
    out = T.PadToSize(32)(corner_sample())
    assert tuple(out["image"].shape) == (3, 32, 32) and bool((out["image"][:, 20:] == 128).all())
    assert bool((out["semantic"][:, 20:] == 255).all()) and not out["masks"][:, 20:].any()
    with pytest.raises(ValueError, match="larger than the pad size"):
        T.PadToSize(10)(corner_sample())


def test_presets_pick_each_reference_mapper():
    def built(name, *overrides):
        config = load_config(name, list(overrides))
        return build_train_transforms(config.data, config.test.task)

    ade = built("ade20k_semantic_r50").transforms
    assert [type(t).__name__ for t in ade] == ["ResizeShortestEdge", "RandomCrop", "ColorAugSSD",
                                                "RandomHorizontalFlip", "PadToSize"]
    assert ade[0].short_edge_length == [int(x * 0.1 * 512) for x in range(5, 21)] and ade[0].max_size == 2048
    assert ade[0].label_resize == "torch" and ade[1].drop_empty and ade[4].size == (512, 512)
    city = built("cityscapes_panoptic_r50").transforms
    assert [type(t).__name__ for t in city] == ["ResizeShortestEdge", "RandomCrop", "ColorAugSSD",
                                                 "RandomHorizontalFlip"]
    assert city[0].max_size == 4096 and city[0].label_resize == "pil" and not city[1].drop_empty
    assert built("cityscapes_semantic_r50").transforms[0].label_resize == "torch"
    coco_panoptic = built("coco_panoptic_r50").transforms[1]
    coco_instance = built("coco_instance_r50").transforms[1]
    assert coco_panoptic.image_pad_value == 128 and not coco_panoptic.drop_empty and coco_instance.drop_empty
    assert built("fashion_scenes_lite0") is None  # default preset: no augmentation, unchanged


# ------------------------------------------------------------------------------------------------- SSD colour
def test_hsv_by_hand():
    pixels = np.array([[[200, 100, 50], [77, 77, 77], [0, 0, 255], [0, 0, 0]]], dtype=np.uint8)
    # (200,100,50): V 200, S round(150*255/200)=191, H = 60*(100-50)/150 = 20 deg -> 10
    assert rgb_to_hsv(pixels).tolist() == [[[10, 191, 200], [0, 0, 77], [120, 255, 255], [0, 0, 0]]]
    assert hsv_to_rgb(np.array([[[10, 191, 200]]], dtype=np.uint8)).tolist() == [[[200, 100, 50]]]


def test_hsv_matches_opencv_on_every_colour():
    values = np.arange(256, dtype=np.uint8)
    grid = np.stack(np.meshgrid(values, values, values, indexing="ij"), -1).reshape(4096, 4096, 3)
    assert np.array_equal(rgb_to_hsv(grid), cv2.cvtColor(np.ascontiguousarray(grid[..., ::-1]), cv2.COLOR_BGR2HSV))
    # width 4096: every pixel takes OpenCV's vectorised loop (no scalar tail)
    assert np.array_equal(hsv_to_rgb(grid), cv2.cvtColor(grid, cv2.COLOR_HSV2RGB))


class Forced(ColorAugSSD):
    """Draws from lists: coins (0/1) and values."""

    def __init__(self, coins, values):
        super().__init__()
        self.coins, self.values = list(coins), list(values)

    def _coin(self):
        return bool(self.coins.pop(0))

    def _uniform(self, low, high):
        value = self.values.pop(0)
        assert low <= value <= high
        return value

    def _randint(self, low, high):
        return self._uniform(low, high)


def one_pixel(rgb):
    return np.array([[rgb]], dtype=np.uint8)


def test_brightness_and_contrast_by_hand():
    pixels = np.array([[[0, 100, 250]]], dtype=np.uint8)
    # brightness +10.7 -> 10.7, 110.7, 260.7 -> clip -> truncate: 10, 110, 255
    # order coin 1: contrast x1.5 -> 15, 165, 382.5 -> 15, 165, 255; saturation and hue coins 0
    assert Forced([1, 1, 1, 0, 0], [10.7, 1.5]).apply_rgb(pixels).tolist() == [[[15, 165, 255]]]
    # brightness -20.5 -> -20.5, 79.5, 229.5 -> 0, 79, 229; contrast x0.5 (order coin 0: after hue) -> 0, 39, 114
    assert Forced([1, 0, 0, 0, 1], [-20.5, 0.5]).apply_rgb(pixels).tolist() == [[[0, 39, 114]]]


def test_saturation_and_hue_by_hand():
    orange = one_pixel([200, 100, 50])  # HSV (10, 191, 200)
    # saturation x0.5: S 95.5 -> 95; back: h = 1/3 in sector 0 -> r = v = 200,
    # g = 200 (1 - 95/255 * 2/3) = 150.3 -> 150, b = 200 (1 - 95/255) = 125.5 -> 125
    assert Forced([0, 0, 1, 0, 0], [0.5]).apply_rgb(orange).tolist() == [[[200, 150, 125]]]
    # hue -18: H (10 - 18) mod 180 = 172 -> h = 5.733, sector 5: r = v = 200,
    # g = 200 (1 - 191/255) = 50.2 -> 50, b = 200 (1 - 191/255 * 0.7333) = 90.1 -> 90
    assert Forced([0, 0, 0, 1, 0], [-18]).apply_rgb(orange).tolist() == [[[200, 50, 90]]]
    # hue +18: H 28 -> h = 0.933 in sector 0: r = 200, g = 200 (1 - 191/255 * 0.0667) = 190.0 -> 190, b = 50
    assert Forced([0, 0, 0, 1, 0], [18]).apply_rgb(orange).tolist() == [[[200, 190, 50]]]


def test_each_op_is_gated_by_its_own_coin_and_order_follows_the_reference():
    pixels = astronaut()[:, :64, :64].permute(1, 2, 0).numpy().copy()
    assert np.array_equal(Forced([0, 1, 0, 0, 0], []).apply_rgb(pixels), pixels)  # every coin 0: untouched
    assert np.array_equal(Forced([0, 0, 0, 0, 0], []).apply_rgb(pixels), pixels)
    aug = ColorAugSSD()
    contrast = lambda x: Forced([1], [1.4]).contrast(x)  # noqa: E731
    hue = lambda x: Forced([1], [7]).hue(x)  # noqa: E731
    first = Forced([0, 1, 1, 0, 1], [1.4, 7]).apply_rgb(pixels)  # contrast, saturation (off), hue
    second = Forced([0, 0, 0, 1, 1], [7, 1.4]).apply_rgb(pixels)  # saturation (off), hue, contrast
    assert np.array_equal(first, hue(contrast(pixels))) and np.array_equal(second, contrast(hue(pixels)))
    assert not np.array_equal(first, second)
    # the coins are fair: Python's random.randrange(2), one per op plus one for the order
    coins = []
    original = random.randrange

    def record(n):
        coins.append(n)
        return original(n)
    random.seed(0)
    try:
        random.randrange = record
        aug.apply_rgb(pixels)
    finally:
        random.randrange = original
    assert coins == [2] * 5


def reference_ssd(bgr, coins, values):
    """Mask2Former's colour augmentation written with OpenCV on BGR, draws from lists (test oracle)."""
    coins, values = list(coins), list(values)

    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(img):
        return convert(img, alpha=values.pop(0)) if coins.pop(0) else img

    def saturation(img):
        if coins.pop(0):
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=values.pop(0))
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        return img

    def hue(img):
        if coins.pop(0):
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + values.pop(0)) % 180
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        return img

    img = convert(bgr, beta=values.pop(0)) if coins.pop(0) else bgr
    if coins.pop(0):
        return hue(saturation(contrast(img)))
    return contrast(hue(saturation(img)))


@pytest.mark.parametrize("coins,values", [
    ([1, 1, 1, 1, 1], [-31.2, 1.37, 0.61, -13]),
    ([1, 0, 1, 1, 1], [25.9, 1.45, 11, 0.72]),
    ([0, 1, 0, 1, 1], [0.5, 17]),
])
def test_ssd_colour_matches_opencv_reference(coins, values):
    rgb = astronaut()[:, 100:164, :].permute(1, 2, 0).numpy().copy()  # width 512: no scalar tail in OpenCV
    ours = Forced(coins, values).apply_rgb(rgb)
    reference = reference_ssd(np.ascontiguousarray(rgb[..., ::-1]), coins, values)[..., ::-1]
    assert np.array_equal(ours, reference)


def test_ssd_on_samples_touches_only_the_image():
    sample = corner_sample()
    out = Forced([1, 1, 1, 1, 1], [12.0, 1.2, 0.8, 5])(sample)
    assert out["image"].dtype == torch.uint8 and not torch.equal(out["image"], sample["image"])
    for key in ("labels", "masks", "semantic", "iscrowd"):
        assert torch.equal(out[key], sample[key])
