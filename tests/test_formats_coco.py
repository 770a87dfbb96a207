import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from mask2former.data.formats.coco import CocoInstanceDataset

HEIGHT, WIDTH = 8, 10


def hand_masks():
    polygon = np.zeros((HEIGHT, WIDTH), dtype=bool)
    polygon[1:3, 1:4] = True  # polygon (1,1)-(4,1)-(4,3)-(1,3) covers x in [1,4), y in [1,3)
    crowd = np.zeros((HEIGHT, WIDTH), dtype=bool)
    crowd[:, 0:2] = True  # uncompressed RLE [0, 16, 64]: columns 0-1 (column-major counts)
    compressed = np.zeros((HEIGHT, WIDTH), dtype=bool)
    compressed[5:8, 6:10] = True
    compressed[2, 2] = True  # overlaps the polygon: later annotations win in the semantic map
    return polygon, crowd, compressed


def write_fixture(tmp_path, annotations=None, images=None, categories=None):
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(image_dir / name)
    _, _, compressed = hand_masks()
    rle = mask_utils.encode(np.asfortranarray(compressed.astype(np.uint8)))
    data = {
        "images": images or [{"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
                             {"id": 2, "file_name": "b.png", "height": HEIGHT, "width": WIDTH}],
        "annotations": annotations if annotations is not None else [
            {"id": 10, "image_id": 1, "category_id": 5, "iscrowd": 0,
             "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]], "area": 6, "bbox": [1, 1, 3, 2]},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [HEIGHT, WIDTH], "counts": [0, 16, 64]}, "area": 16, "bbox": [0, 0, 2, 8]},
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")}, "area": 13,
             "bbox": [2, 2, 8, 6]},
        ],
        "categories": categories or [{"id": 5, "name": "dog"}, {"id": 1, "name": "person"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, image_dir


def test_polygon_and_rle_masks_crowd_and_semantic(tmp_path):
    path, image_dir = write_fixture(tmp_path)
    dataset = CocoInstanceDataset(path, image_dir)
    assert dataset.label_space.names == ["person", "dog"] and dataset.label_space.dataset_ids == [1, 5]
    sample = dataset[0]
    polygon, crowd, compressed = hand_masks()
    assert sample["labels"].tolist() == [1, 0, 0]
    assert sample["iscrowd"].tolist() == [False, True, False]
    assert sample["masks"].dtype == torch.bool and tuple(sample["masks"].shape) == (3, HEIGHT, WIDTH)
    for got, expected in zip(sample["masks"].numpy(), (polygon, crowd, compressed)):
        assert np.array_equal(got, expected)
    semantic = np.full((HEIGHT, WIDTH), 255)
    semantic[polygon] = 1
    semantic[crowd] = 0
    semantic[compressed] = 0
    assert sample["semantic"].dtype == torch.int64 and np.array_equal(sample["semantic"].numpy(), semantic)
    assert sample["image_id"] == 1 and sample["file_name"].endswith("a.png") and sample["orig_size"] == (HEIGHT, WIDTH)
    assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), np.asarray(Image.open(image_dir / "a.png")))


def test_masks_match_pycocotools_annToMask(tmp_path):
    path, image_dir = write_fixture(tmp_path)
    coco = COCO(str(path))
    sample = CocoInstanceDataset(path, image_dir)[0]
    for got, annotation_id in zip(sample["masks"].numpy(), (10, 11, 12)):
        assert np.array_equal(got, coco.annToMask(coco.anns[annotation_id]).astype(bool))


def test_image_without_annotations_is_kept(tmp_path):
    path, image_dir = write_fixture(tmp_path)
    dataset = CocoInstanceDataset(path, image_dir)
    assert len(dataset) == 2
    sample = dataset[1]
    assert sample["image_id"] == 2
    assert sample["labels"].shape == (0,) and tuple(sample["masks"].shape) == (0, HEIGHT, WIDTH)
    assert sample["iscrowd"].shape == (0,) and bool((sample["semantic"] == 255).all())


def test_empty_polygons_dropped_with_warning(tmp_path):
    annotations = [
        {"id": 20, "image_id": 1, "category_id": 5, "segmentation": [], "iscrowd": 0},
        {"id": 21, "image_id": 1, "category_id": 5, "segmentation": [[1, 2, 3, 4]], "iscrowd": 0},  # 2 points only
        {"id": 22, "image_id": 1, "category_id": 5, "segmentation": [[], [1, 1, 4, 1, 4, 3, 1, 3]], "iscrowd": 0},
    ]
    path, image_dir = write_fixture(tmp_path, annotations=annotations)
    with pytest.warns(UserWarning, match=r"instances\.json: dropped 2 annotation\(s\) .*\[20, 21\]"):
        dataset = CocoInstanceDataset(path, image_dir)
    assert dataset.dropped_annotation_ids == [20, 21]
    assert dataset.counts.summary() == {"dog": {"read": 1, "skipped": {"without a valid polygon": 2}}}
    sample = dataset[0]
    assert sample["labels"].tolist() == [1]  # annotation 22 keeps its one valid polygon
    assert np.array_equal(sample["masks"][0].numpy(), hand_masks()[0])


def test_annotation_for_missing_image_is_an_error(tmp_path):
    annotations = [{"id": 30, "image_id": 99, "category_id": 5, "segmentation": [[1, 1, 4, 1, 4, 3]]}]
    path, image_dir = write_fixture(tmp_path, annotations=annotations)
    with pytest.raises(ValueError, match=r"instances\.json: annotation 30 refers to missing image id 99"):
        CocoInstanceDataset(path, image_dir)


def test_unknown_category_id_is_an_error(tmp_path):
    annotations = [{"id": 31, "image_id": 1, "category_id": 7, "segmentation": [[1, 1, 4, 1, 4, 3]]}]
    path, image_dir = write_fixture(tmp_path, annotations=annotations)
    with pytest.raises(ValueError, match=r"instances\.json annotation 31: unknown category id 7\b"):
        CocoInstanceDataset(path, image_dir)


def test_image_size_differs_from_json(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": HEIGHT + 1, "width": WIDTH}]
    path, image_dir = write_fixture(tmp_path, annotations=[], images=images)
    with pytest.raises(ValueError, match=r"image .*a\.png is 10x8 \(WxH\) but .*instances\.json says 10x9"):
        CocoInstanceDataset(path, image_dir)[0]


def test_rle_size_differs_from_image(tmp_path):
    annotations = [{"id": 40, "image_id": 1, "category_id": 5, "iscrowd": 1,
                    "segmentation": {"size": [HEIGHT, WIDTH + 1], "counts": [0, 88]}}]
    path, image_dir = write_fixture(tmp_path, annotations=annotations)
    with pytest.raises(ValueError, match=r"annotation 40: RLE size \[8, 11\]"):
        CocoInstanceDataset(path, image_dir)[0]


def test_missing_image_file(tmp_path):
    path, image_dir = write_fixture(tmp_path)
    (image_dir / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.png"):
        CocoInstanceDataset(path, image_dir)[1]


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*none\.json"):
        CocoInstanceDataset(tmp_path / "none.json", tmp_path)


def test_transforms_are_applied(tmp_path):
    path, image_dir = write_fixture(tmp_path)
    dataset = CocoInstanceDataset(path, image_dir, transforms=lambda sample: {**sample, "seen": True})
    assert dataset[0]["seen"] is True


def _layout_config(root):
    from mask2former.config import Config

    config = Config()
    config.data.dataset, config.data.root, config.data.augmentation = "coco", str(root), "none"
    return config


def test_cvat_coco_1_0_layout_is_found_without_extra(tmp_path):
    from mask2former.data.build import build_dataset, build_datasets

    path, image_dir = write_fixture(tmp_path)  # images/ + a JSON, moved to CVAT's name
    (tmp_path / "annotations").mkdir()
    path.rename(tmp_path / "annotations" / "instances_default.json")
    dataset, labels = build_dataset(_layout_config(tmp_path), "train", train=True)
    assert len(dataset) == 2 and labels.names == ["person", "dog"]
    assert dataset[0]["labels"].tolist() == [1, 0, 0] and dataset.image_root == image_dir
    with pytest.raises(FileNotFoundError, match=r"no 'val' annotations .*instances_default\.json.*val_fraction"):
        build_dataset(_layout_config(tmp_path), "val", train=False)
    config = _layout_config(tmp_path)
    config.data.val_fraction = 0.5
    train, val, _ = build_datasets(config)
    assert len(train) == len(val) == 1
    assert {train[0]["image_id"], val[0]["image_id"]} == {1, 2}


def test_roboflow_layout_with_valid_split(tmp_path):
    from mask2former.data.build import build_datasets

    for split in ("train", "valid"):
        folder = tmp_path / split
        folder.mkdir()
        # Roboflow lists the project as category 0, the parent of the classes, used by no annotation.
        path, image_dir = write_fixture(folder, categories=[
            {"id": 0, "name": "pets", "supercategory": "none"}, {"id": 5, "name": "dog", "supercategory": "pets"},
            {"id": 1, "name": "person", "supercategory": "pets"}])
        for image in image_dir.iterdir():  # Roboflow keeps the images beside the JSON
            image.rename(folder / image.name)
        path.rename(folder / "_annotations.coco.json")
    train, val, labels = build_datasets(_layout_config(tmp_path))
    assert labels.names == ["person", "dog"]
    assert train.counts.summary() == {"dog": {"read": 1, "skipped": {}}, "person": {"read": 2, "skipped": {}}}
    assert len(train) == len(val) == 2 and val.annotation_file == tmp_path / "valid" / "_annotations.coco.json"
    assert train[0]["labels"].tolist() == [1, 0, 0]


def test_unknown_category_in_a_found_layout_names_file_and_annotation(tmp_path):
    from mask2former.data.build import build_dataset

    (tmp_path / "train").mkdir()
    path, _ = write_fixture(tmp_path / "train", annotations=[
        {"id": 77, "image_id": 1, "category_id": 9, "iscrowd": 0, "segmentation": [[1, 1, 4, 1, 4, 3]]}])
    path.rename(tmp_path / "train" / "_annotations.coco.json")
    with pytest.raises(ValueError, match=r"_annotations\.coco\.json annotation 77: unknown category id 9"):
        build_dataset(_layout_config(tmp_path), "train", train=True)
