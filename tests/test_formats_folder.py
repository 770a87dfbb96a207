import numpy as np
import pytest
from PIL import Image

from mask2former.data.formats.folder import FolderDataset
from mask2former.data.label_space import LabelSpace


def write_fixture(tmp_path, labels, yaml_text="names: [sky, road, car]\nis_thing: [false, false, true]\n",
                  split=None, image_shapes=None):
    image_dir = tmp_path / "images" / (split or "")
    label_dir = tmp_path / "labels" / (split or "")
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for index, (name, label) in enumerate(labels.items()):
        shape = (image_shapes or {}).get(name, label.shape)
        Image.fromarray(np.full((*shape, 3), 10 * index, dtype=np.uint8)).save(image_dir / f"{name}.jpg")
        Image.fromarray(label).save(label_dir / f"{name}.png")
    (tmp_path / "classes.yaml").write_text(yaml_text)
    return tmp_path


def test_reads_semantic_folder(tmp_path):
    labels = {"b": np.array([[0, 0, 2], [255, 1, 2]], dtype=np.uint8), "a": np.array([[1, 1]], dtype=np.uint8)}
    dataset = FolderDataset(write_fixture(tmp_path, labels))
    assert len(dataset) == 2 and dataset.label_space.is_thing == [False, False, True]
    first, second = dataset[0], dataset[1]
    assert first["image_id"] == "a" and second["image_id"] == "b"  # sorted by file name
    assert np.array_equal(second["semantic"].numpy(), np.array([[0, 0, 2], [255, 1, 2]]))
    assert second["labels"].tolist() == [0, 1, 2]
    assert np.array_equal(second["masks"][2].numpy(), labels["b"] == 2)
    assert not second["iscrowd"].any() and first["labels"].tolist() == [1]


def test_dataset_ids_and_16_bit_labels(tmp_path):
    yaml_text = "classes:\n  - {name: bg, id: 10}\n  - {name: cell, id: 300, isthing: true}\n"
    labels = {"x": np.array([[10, 300], [255, 300]], dtype=np.uint16)}
    sample = FolderDataset(write_fixture(tmp_path, labels, yaml_text))[0]
    assert np.array_equal(sample["semantic"].numpy(), np.array([[0, 1], [255, 1]]))


def test_split_subfolder_and_label_space_object(tmp_path):
    labels = {"x": np.array([[0, 1]], dtype=np.uint8)}
    root = write_fixture(tmp_path, labels, split="val")
    space = LabelSpace(names=["p", "q"], is_thing=[False, False])
    assert FolderDataset(root, split="val", label_space=space)[0]["labels"].tolist() == [0, 1]


def test_unknown_value_is_an_error(tmp_path):
    dataset = FolderDataset(write_fixture(tmp_path, {"x": np.array([[0, 3]], dtype=np.uint8)}))
    with pytest.raises(ValueError, match=r"label file .*x\.png contains unknown label value\(s\) \[3\]"):
        dataset[0]


def test_label_size_mismatch(tmp_path):
    root = write_fixture(tmp_path, {"x": np.zeros((2, 3), dtype=np.uint8)}, image_shapes={"x": (3, 2)})
    with pytest.raises(ValueError, match=r"label .*labels/x\.png is 3x2 \(WxH\) but its image .*images/x\.jpg is 2x3"):
        FolderDataset(root)[0]


def test_missing_label_and_missing_yaml(tmp_path):
    root = write_fixture(tmp_path, {"x": np.zeros((2, 2), dtype=np.uint8)})
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(root / "images" / "y.png")
    with pytest.raises(FileNotFoundError, match=r"no label .*labels/y\.png for image .*images/y\.png"):
        FolderDataset(root)
    (root / "images" / "y.png").unlink()
    (root / "classes.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"label space file not found: .*classes\.yaml"):
        FolderDataset(root)
