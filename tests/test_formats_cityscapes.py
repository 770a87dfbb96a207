import numpy as np
import pytest
from PIL import Image

from mask2former.data.formats.cityscapes import (
    NUM_LABEL_IDS,
    CityscapesDataset,
    cityscapes_label_space,
    label_id_to_train_id_table,
)

STEM = "aachen_000000_000019"
INSTANCE_IDS = np.array([
    [7, 7, 26001, 26001],
    [24000, 24000, 26002, 26],  # 26 < 1000 on a thing class (car): a crowd region
    [23, 23, 29000, 0],  # 29000: caravan instance (ignored in eval); 0: unlabeled
], dtype=np.uint16)


def write_fixture(tmp_path, suffix, label, image_shape=None, split="train", city="aachen"):
    image_dir = tmp_path / "leftImg8bit" / split / city
    label_dir = tmp_path / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    shape = image_shape or label.shape
    Image.fromarray(np.full((*shape, 3), 50, dtype=np.uint8)).save(image_dir / f"{STEM}_leftImg8bit.png")
    Image.fromarray(label).save(label_dir / f"{STEM}_gtFine_{suffix}.png")
    return tmp_path


def test_table_matches_cityscapesscripts():
    labels_module = pytest.importorskip("cityscapesscripts.helpers.labels")
    oracle = {label.id: label for label in labels_module.labels if label.id >= 0}
    assert sorted(oracle) == list(range(NUM_LABEL_IDS))
    table = label_id_to_train_id_table()
    for label_id, reference in oracle.items():
        assert table[label_id] == reference.trainId, reference.name
        assert (table[label_id] == 255) == reference.ignoreInEval
    space = cityscapes_label_space()
    for train_id in range(space.num_classes):
        reference = oracle[space.to_dataset(train_id)]
        assert reference.trainId == train_id
        assert (space.names[train_id], space.is_thing[train_id], space.colors[train_id]) == (
            reference.name, reference.hasInstances, reference.color)


def test_label_space_is_the_19_train_classes():
    space = cityscapes_label_space()
    assert space.num_classes == 19 and space.ignore_index == 255
    assert space.names[:3] == ["road", "sidewalk", "building"] and space.names[-1] == "bicycle"
    assert [space.names[i] for i in space.thing_ids] == ["person", "rider", "car", "truck", "bus", "train",
                                                         "motorcycle", "bicycle"]
    assert space.to_contiguous(26) == 13 and space.to_dataset(18) == 33


def test_semantic_from_label_ids(tmp_path):
    label_ids = np.array([[7, 8, 9], [24, 33, 0]], dtype=np.uint8)
    sample = CityscapesDataset(write_fixture(tmp_path, "labelIds", label_ids), target="semantic")[0]
    expected = np.array([[0, 1, 255], [11, 18, 255]])
    assert np.array_equal(sample["semantic"].numpy(), expected)
    assert sample["labels"].tolist() == [0, 1, 11, 18] and not sample["iscrowd"].any()
    assert sample["image_id"] == STEM


def test_semantic_from_train_ids(tmp_path):
    train_ids = np.array([[0, 18, 255], [5, 5, 10]], dtype=np.uint8)
    dataset = CityscapesDataset(write_fixture(tmp_path, "labelTrainIds", train_ids), target="semantic",
                                label_type="trainIds")
    sample = dataset[0]
    assert np.array_equal(sample["semantic"].numpy(), train_ids.astype(np.int64))
    assert sample["labels"].tolist() == [0, 5, 10, 18]


def test_invalid_values_are_errors(tmp_path):
    dataset = CityscapesDataset(write_fixture(tmp_path, "labelTrainIds", np.array([[0, 19]], dtype=np.uint8)),
                                target="semantic", label_type="trainIds")
    with pytest.raises(ValueError, match=r"labelTrainIds\.png contains unknown label value\(s\) \[19\]"):
        dataset[0]
    dataset = CityscapesDataset(write_fixture(tmp_path, "labelIds", np.array([[7, 34]], dtype=np.uint8)),
                                target="semantic")
    with pytest.raises(ValueError, match=r"labelIds\.png contains unknown label value\(s\) \[34\]"):
        dataset[0]


def test_panoptic_from_instance_ids(tmp_path):
    dataset = CityscapesDataset(write_fixture(tmp_path, "instanceIds", INSTANCE_IDS), target="panoptic")
    sample = dataset[0]
    # unique raw values in order: 0 (ignore), 7 road, 23 sky, 26 car crowd, 24000 person, 26001 car, 26002 car,
    # 29000 caravan (ignore)
    assert sample["labels"].tolist() == [0, 10, 13, 11, 13, 13]
    assert sample["iscrowd"].tolist() == [False, False, True, False, False, False]
    for mask, value in zip(sample["masks"].numpy(), (7, 23, 26, 24000, 26001, 26002)):
        assert np.array_equal(mask, INSTANCE_IDS == value)
    expected = np.array([[0, 0, 13, 13], [11, 11, 13, 13], [10, 10, 255, 255]])
    assert np.array_equal(sample["semantic"].numpy(), expected)
    void = ~sample["masks"].any(0).numpy()
    assert np.array_equal(void, (INSTANCE_IDS == 0) | (INSTANCE_IDS == 29000))


def test_instance_value_on_stuff_class_is_an_error(tmp_path):
    ids = INSTANCE_IDS.copy()
    ids[0, 0] = 7001  # road has no instances
    dataset = CityscapesDataset(write_fixture(tmp_path, "instanceIds", ids))
    with pytest.raises(ValueError, match=r"instanceIds\.png has instance value 7001 for stuff class 'road'"):
        dataset[0]


def test_label_size_mismatch(tmp_path):
    dataset = CityscapesDataset(write_fixture(tmp_path, "instanceIds", INSTANCE_IDS, image_shape=(3, 5)))
    with pytest.raises(ValueError, match=r"label .*instanceIds\.png is 4x3 \(WxH\) but its image .*leftImg8bit\.png"):
        dataset[0]


def test_missing_label_file(tmp_path):
    root = write_fixture(tmp_path, "labelIds", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match=r"no label .*_gtFine_instanceIds\.png for image .*_leftImg8bit\.png"):
        CityscapesDataset(root, target="panoptic")
