import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from mask2former.config import Config
from mask2former.data.build import build_datasets
from mask2former.data.export import export_samples
from mask2former.data.fashion_scenes import FashionScenes
from mask2former.data.formats import LabelmeDataset, YoloDataset
from mask2former.data.formats._common import make_sample
from mask2former.data.label_space import LabelSpace
from mask2former.data.polygons import mask_to_polygons, rasterize


def segments(sample, keep=None):
    labels, masks, crowd = (sample[key].numpy() for key in ("labels", "masks", "iscrowd"))
    keep = np.ones(len(labels), dtype=bool) if keep is None else keep[labels]
    return sorted((int(l), bool(c), m.tobytes()) for l, m, c in zip(labels[keep], masks[keep], crowd[keep]))


def test_traced_polygons_redraw_hole_free_components_exactly():
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = ndimage.binary_opening(rng.random((12, 14)) < 0.55) | (rng.random((12, 14)) < 0.1)
        components, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for index in range(1, count + 1):
            component = components == index
            (polygon,) = mask_to_polygons(component)
            # Oracle: a polygon holds no hole, so the redraw is the component with its holes filled.
            assert np.array_equal(rasterize([("polygon", polygon)], *mask.shape), ndimage.binary_fill_holes(component))
    # A 2x2 square keeps its 4 corners only; a single pixel repeats itself to make a polygon.
    square = np.zeros((4, 4), dtype=bool)
    square[1:3, 1:3] = True
    assert sorted(map(tuple, mask_to_polygons(square)[0].tolist())) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    dot = np.zeros((3, 3), dtype=bool)
    dot[1, 2] = True
    assert mask_to_polygons(dot)[0].tolist() == [[2, 1]] * 3


def hand_sample():
    """A stuff ring with a thing in its hole, a thing in two parts, a crowd thing and an unlabelled hole."""
    height, width = 12, 12
    ring = np.zeros((height, width), dtype=bool)
    ring[1:11, 1:11] = True
    ring[3:6, 3:6] = False  # hole holding the thing below
    ring[7:9, 7:9] = False  # unlabelled hole: must come back unlabelled
    inner = np.zeros_like(ring)
    inner[3:6, 3:6] = True
    parts = np.zeros_like(ring)
    parts[0, 0:3] = True
    parts[11, 9:12] = True
    crowd = np.zeros_like(ring)
    crowd[5:7, 11] = True
    masks = np.stack([ring, inner, parts, crowd])
    semantic = np.full((height, width), 255)
    for label, mask in zip([0, 1, 1, 2], masks):
        semantic[mask] = label
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    sample = make_sample(image, [0, 1, 1, 2], masks, [False, False, False, True], semantic, 7, "x.png")
    space = LabelSpace(names=["wall", "cup", "crowd"], is_thing=[False, True, True])
    return sample, space


def test_labelme_round_trip_of_hand_made_panoptic_sample(tmp_path):
    sample, space = hand_sample()
    export_samples([sample], space, tmp_path, format="labelme", split="train")
    shapes = json.loads((tmp_path / "train" / "000000000007.json").read_text())["shapes"]
    assert shapes[0]["label"] == "wall"  # stuff first
    assert [s["label"] for s in shapes].count("__ignore__") == 1  # the unlabelled hole is repainted as ignored
    cup_groups = [s["group_id"] for s in shapes if s["label"] == "cup"]
    assert len(cup_groups) == 3 and len({g for g in cup_groups if g is not None}) == 1
    back = LabelmeDataset(tmp_path / "train")
    assert back.label_space == space
    read = back[0]
    assert segments(read) == segments(sample)
    assert np.array_equal(read["semantic"].numpy(), sample["semantic"].numpy())
    # labels.txt as labelme's tools want it; alone (no classes.yaml) it fixes the order, all classes things.
    assert (tmp_path / "labels.txt").read_text().split() == ["__ignore__", "_background_", "wall", "cup", "crowd"]
    (tmp_path / "classes.yaml").unlink()
    assert LabelmeDataset(tmp_path / "train").label_space.names == ["wall", "cup", "crowd"]


def test_yolo_round_trip_keeps_things_and_says_what_it_cannot_hold(tmp_path, caplog):
    sample, space = hand_sample()
    export_samples([sample], space, tmp_path, format="yolo", split="train")
    assert "1 stuff segments (YOLO is things only)" in caplog.text
    assert "1 objects in several parts" in caplog.text and "1 crowd flags" in caplog.text
    read = YoloDataset(tmp_path / "data.yaml", "train")[0]
    assert read["labels"].tolist() == [1, 1, 1, 2]  # the two-part cup comes back as two objects
    union = read["masks"][1].numpy() | read["masks"][2].numpy()
    assert np.array_equal(read["masks"][0].numpy(), sample["masks"][1].numpy())
    assert np.array_equal(union, sample["masks"][2].numpy())
    things = np.where(np.isin(sample["semantic"].numpy(), [1, 2]), sample["semantic"].numpy(), 255)
    assert np.array_equal(read["semantic"].numpy(), things)


@pytest.mark.parametrize("format", ["labelme", "yolo"])
def test_fashion_scenes_round_trip(tmp_path, format):
    dataset = FashionScenes(split="train", num_images=3, seed=0, image_size=64)
    samples = [dataset[index] for index in range(3)]
    export_samples(samples, dataset.label_space, tmp_path, format=format, split="train")
    config = Config()
    config.data.dataset, config.data.root, config.data.augmentation = format, str(tmp_path), "none"
    config.data.val_split = ""
    train, _, labels = build_datasets(config)
    things = np.flatnonzero(dataset.label_space.is_thing)
    for sample, index in zip(samples, range(len(train))):
        back = train[index]
        assert torch.equal(back["image"], sample["image"])
        if format == "labelme":
            assert segments(back) == segments(sample)
            assert torch.equal(back["semantic"], sample["semantic"])
        else:  # things only, each part its own object: compare the painted classes
            semantic = sample["semantic"].numpy()
            expected = np.where(np.isin(semantic, things), semantic, 255)
            assert np.array_equal(back["semantic"].numpy(), expected)
    assert labels.names == dataset.label_space.names
    assert labels.is_thing == (dataset.label_space.is_thing if format == "labelme" else [True] * len(labels.names))


@pytest.mark.parametrize("format, files", [("labelme", ["labels.txt", "classes.yaml", "val/000000000000.json"]),
                                           ("yolo", ["data.yaml", "labels/val/000000000000.txt"])])
def test_cli_data_export_writes_the_polygon_formats(tmp_path, format, files):
    from mask2former.cli import main

    assert main(["data", "export", "fashion-scenes", str(tmp_path), "--format", format, "--num-images", "1"]) == 0
    assert all((tmp_path / name).is_file() for name in files)
