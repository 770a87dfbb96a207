import numpy as np
import pytest
from PIL import Image

from mask2former.data.formats.ade20k import ADE20KDataset, ade20k_label_space
from mask2former.data.label_space import LabelSpace, builtin_label_space

RAW = np.array([[0, 1, 150, 150], [255, 2, 1, 1], [3, 3, 0, 2]], dtype=np.uint8)


def write_fixture(tmp_path, raw=RAW, split="training", image_shape=None, name="ADE_train_00000001"):
    images = tmp_path / "images" / split
    labels = tmp_path / "annotations" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    shape = image_shape or raw.shape
    Image.fromarray(np.full((*shape, 3), 90, dtype=np.uint8)).save(images / f"{name}.jpg")
    Image.fromarray(raw, mode="L").save(labels / f"{name}.png")
    return tmp_path


def mmseg_reduce_zero_label(raw):
    """mmseg's reduce_zero_label, written out as the oracle: 0 -> 255, v -> v - 1, and 255 stays 255."""
    label = raw.astype(np.int64).copy()
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255
    return label


def test_reduce_zero_label(tmp_path):
    dataset = ADE20KDataset(write_fixture(tmp_path))
    sample = dataset[0]
    expected = np.array([[255, 0, 149, 149], [255, 1, 0, 0], [2, 2, 255, 1]])
    assert np.array_equal(sample["semantic"].numpy(), expected)
    assert np.array_equal(sample["semantic"].numpy(), mmseg_reduce_zero_label(RAW))
    assert sample["labels"].tolist() == [0, 1, 2, 149]
    for label, mask in zip(sample["labels"].tolist(), sample["masks"].numpy()):
        assert np.array_equal(mask, expected == label)
    assert not sample["iscrowd"].any()
    assert not sample["masks"].any(0)[expected == 255].any()  # ignore pixels are in no mask
    assert sample["image_id"] == "ADE_train_00000001"


def test_without_reduce_zero_label(tmp_path):
    raw = np.array([[0, 1], [255, 149]], dtype=np.uint8)
    dataset = ADE20KDataset(write_fixture(tmp_path, raw=raw), reduce_zero_label=False)
    assert np.array_equal(dataset[0]["semantic"].numpy(), np.array([[0, 1], [255, 149]]))
    assert dataset[0]["labels"].tolist() == [0, 1, 149]


def test_things_from_label_space_still_one_mask_per_class(tmp_path):
    space = LabelSpace(names=["wall", "person", "sky"], is_thing=[False, True, False], dataset_ids=[1, 2, 3])
    raw = np.array([[1, 2], [2, 3]], dtype=np.uint8)
    sample = ADE20KDataset(write_fixture(tmp_path, raw=raw), label_space=space)[0]
    assert sample["labels"].tolist() == [0, 1, 2] and sample["masks"][1].sum() == 2


def test_value_outside_label_space_is_an_error(tmp_path):
    raw = RAW.copy()
    raw[0, 0] = 151
    dataset = ADE20KDataset(write_fixture(tmp_path, raw=raw))
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png contains unknown label value\(s\) \[151\]"):
        dataset[0]


def test_default_label_space_is_the_builtin_table(tmp_path):
    # As the reference (detectron2's ADE20K_SEM_SEG_CATEGORIES): the 150-class objectInfo150.txt's synonym lists
    # are not used.
    root = write_fixture(tmp_path)
    lines = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0.1\t1\t1\tname{i};alias" for i in range(1, 151)]
    (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    space = ADE20KDataset(root).label_space
    assert space == builtin_label_space("ade20k")
    assert space.names[:3] == ["wall", "building", "sky"] and space.dataset_ids[0] == 1 and not any(space.is_thing)
    unreduced = ade20k_label_space(reduce_zero_label=False)
    assert unreduced.names == space.names and unreduced.dataset_ids == list(range(150))
    assert ade20k_label_space(num_classes=3).names == ["class_0", "class_1", "class_2"]


def test_object_info_names_of_another_class_count(tmp_path):
    root = write_fixture(tmp_path, raw=np.array([[0, 1], [2, 3]], dtype=np.uint8))
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\tshirt\n"
                                            "2\t0.1\t1\t1\tbag\n3\t0.1\t1\t1\tgrass\n")
    space = ADE20KDataset(root).label_space
    assert space.names == ["shirt", "bag", "grass"] and space.dataset_ids == [1, 2, 3] and not any(space.is_thing)


def test_label_size_mismatch(tmp_path):
    dataset = ADE20KDataset(write_fixture(tmp_path, image_shape=(4, 4)))
    with pytest.raises(ValueError, match=r"label .*ADE_train_00000001\.png is 4x3 \(WxH\) but its image "
                                         r".*ADE_train_00000001\.jpg is 4x4"):
        dataset[0]


def test_missing_label_for_image(tmp_path):
    root = write_fixture(tmp_path)
    (root / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no label .*ADE_train_00000001\.png for image .*\.jpg"):
        ADE20KDataset(root)


def test_reduce_zero_label_conflicts_with_dataset_id_zero(tmp_path):
    with pytest.raises(ValueError, match="reduce_zero_label=True makes raw 0 ignore"):
        ADE20KDataset(write_fixture(tmp_path), label_space=ade20k_label_space(num_classes=3, reduce_zero_label=False))
