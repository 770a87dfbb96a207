import json

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.data.export import export_fashion_scenes, export_samples
from mask2former.data.fashion_scenes import FashionScenes
from mask2former.data.formats import CocoInstanceDataset, CocoPanopticDataset, FolderDataset, rgb_to_id

KEYS = ("image", "labels", "masks", "iscrowd", "semantic")


@pytest.fixture(scope="module")
def scenes():
    return FashionScenes("val", num_images=3, seed=4, image_size=(48, 64), source="subset")


def test_coco_panoptic_round_trip(tmp_path, scenes):
    written = export_fashion_scenes(tmp_path, "coco-panoptic", "val", 3, seed=4, image_size=(48, 64), source="subset")
    dataset = CocoPanopticDataset(written["annotations"], written["images"], written["panoptic"])
    assert dataset.label_space == scenes.label_space and len(dataset) == 3
    for index in range(3):
        read, original = dataset[index], scenes[index]
        for key in KEYS:
            assert torch.equal(read[key], original[key]), key
        assert read["image_id"] == original["image_id"]
    data = json.loads(written["annotations"].read_text())
    categories = {category["id"]: category for category in data["categories"]}
    assert categories[1]["name"] == "T-shirt/top" and categories[1]["isthing"] == 1 and categories[13]["isthing"] == 0
    assert all(len(category["color"]) == 3 for category in categories.values())
    segment = data["annotations"][0]["segments_info"][0]
    png = rgb_to_id(np.asarray(Image.open(written["panoptic"] / data["annotations"][0]["file_name"])))
    mask = png == segment["id"]
    assert segment["area"] == int(mask.sum())
    rows, cols = np.nonzero(mask)
    assert segment["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


def test_coco_instance_round_trip(tmp_path, scenes):
    written = export_fashion_scenes(tmp_path, "coco-instance", "val", 3, seed=4, image_size=(48, 64), source="subset")
    dataset = CocoInstanceDataset(written["annotations"], written["images"])
    assert dataset.label_space.names == scenes.label_space.names[:10] and all(dataset.label_space.is_thing)
    for index in range(3):
        read, original = dataset[index], scenes[index]
        things = original["labels"] < 10
        assert torch.equal(read["image"], original["image"])
        assert torch.equal(read["labels"], original["labels"][things])
        assert torch.equal(read["masks"], original["masks"][things])
        semantic = torch.where(original["semantic"] < 10, original["semantic"], 255)
        assert torch.equal(read["semantic"], semantic)
    annotation = json.loads(written["annotations"].read_text())["annotations"][0]
    assert annotation["id"] >= 1 and isinstance(annotation["segmentation"]["counts"], str)


def test_semantic_png_round_trip(tmp_path, scenes):
    written = export_fashion_scenes(tmp_path, "semantic-png", "val", 3, seed=4, image_size=(48, 64), source="subset")
    dataset = FolderDataset(tmp_path, split="val")
    assert dataset.label_space.names == scenes.label_space.names
    assert dataset.label_space.is_thing == scenes.label_space.is_thing
    for index in range(3):
        read, original = dataset[index], scenes[index]
        assert torch.equal(read["image"], original["image"])
        assert torch.equal(read["semantic"], original["semantic"])
    assert written["labels"].is_dir()


def test_bad_format_and_overlapping_panoptic(tmp_path, scenes):
    with pytest.raises(ValueError, match="format must be one of"):
        export_samples([], scenes.label_space, tmp_path, format="voc")
    sample = scenes[0]
    overlapping = {**sample, "masks": torch.cat([sample["masks"], sample["masks"][:1]]),
                   "labels": torch.cat([sample["labels"], sample["labels"][:1]]),
                   "iscrowd": torch.cat([sample["iscrowd"], sample["iscrowd"][:1]])}
    with pytest.raises(ValueError, match="segments of sample 0 overlap"):
        export_samples([overlapping], scenes.label_space, tmp_path)


@pytest.mark.parametrize("format, dataset, layout", [
    ("coco-panoptic", "coco_panoptic", ["annotations/panoptic_val.json", "annotations/instances_val.json",
                                        "panoptic_val/000000000000.png", "val/000000000000.png"]),
    ("coco-panoptic", "coco", ["annotations/instances_val.json"]),
    ("coco-instance", "coco", ["annotations/instances_val.json", "val/000000000000.png"]),
    ("semantic-png", "folder", ["classes.yaml", "images/val/000000000000.png", "labels/val/000000000000.png"]),
])
def test_data_root_alone_reads_every_export(tmp_path, scenes, format, dataset, layout):
    """detectron2's layout per format, so ``data.root=DIR`` alone reads what ``data export`` wrote."""
    from mask2former.config import load_config
    from mask2former.data.build import build_dataset

    export_fashion_scenes(tmp_path, format, "val", 3, seed=4, image_size=(48, 64), source="subset")
    assert all((tmp_path / path).is_file() for path in layout)
    config = load_config("fashion_scenes_lite0", [f"data.dataset={dataset}", f"data.root={tmp_path}"])
    read, label_space = build_dataset(config, "val", train=False)
    assert len(read) == 3
    for index in range(3):
        original = scenes[index]
        keep = original["labels"] < 10 if dataset == "coco" else slice(None)  # coco: the thing segments only
        assert torch.equal(read[index]["image"], original["image"])
        if dataset == "folder":
            assert torch.equal(read[index]["semantic"], original["semantic"])
        else:
            assert torch.equal(read[index]["masks"], original["masks"][keep])
            assert read[index]["image_id"] == original["image_id"]
