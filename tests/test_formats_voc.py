import numpy as np
import pytest
from PIL import Image

from mask2former.config import Config
from mask2former.data.build import build_dataset
from mask2former.data.formats.voc import VOC_CLASSES, VocDataset

HEIGHT, WIDTH = 6, 8


def palette_png(values, path):
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    image.putpalette([channel for index in range(256) for channel in (index, 255 - index, index // 2)])
    image.save(path)


def make_voc(root, with_objects=True, lists=True):
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 100, dtype=np.uint8)).save(root / "JPEGImages" / "2007_000001.jpg")
    classes = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    objects = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    classes[1:3, 1:3] = 15  # person (object 1)
    objects[1:3, 1:3] = 1
    classes[3:5, 4:7] = 15  # another person (object 2)
    objects[3:5, 4:7] = 2
    classes[0, 4:6] = 12  # dog (object 3)
    objects[0, 4:6] = 3
    classes[:, 0] = 255  # VOC's void border
    objects[:, 0] = 255
    palette_png(classes, root / "SegmentationClass" / "2007_000001.png")
    if with_objects:
        palette_png(objects, root / "SegmentationObject" / "2007_000001.png")
    if lists:
        (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    return classes, objects


def test_objects_background_stuff_and_void(tmp_path):
    classes, objects = make_voc(tmp_path)
    dataset = VocDataset(tmp_path, "train")
    assert dataset.label_space.names == list(VOC_CLASSES)
    assert dataset.label_space.is_thing == [False] + [True] * 20
    sample = dataset[0]
    assert sample["labels"].tolist() == [0, 15, 15, 12]
    expected = [classes == 0, objects == 1, objects == 2, objects == 3]
    for got, mask in zip(sample["masks"].numpy(), expected):
        assert np.array_equal(got, mask)
    semantic = classes.astype(np.int64)
    assert np.array_equal(sample["semantic"].numpy(), semantic) and (sample["semantic"][:, 0] == 255).all()
    assert sample["image_id"] == "2007_000001"


def test_labels_txt_semantic_only_and_missing_list(tmp_path):
    make_voc(tmp_path, with_objects=False, lists=False)
    (tmp_path / "SegmentationObject").rmdir()
    names = ["__ignore__", "_background_"] + [f"c{index}" for index in range(1, 16)]
    (tmp_path / "class_names.txt").write_text("\n".join(names) + "\n")  # labelme2voc's file
    dataset = VocDataset(tmp_path, "train")  # no ImageSets lists: every labelled image
    assert dataset.label_space.names[:2] == ["background", "c1"] and dataset.label_space.num_classes == 16
    sample = dataset[0]
    assert sample["labels"].tolist() == [0, 12, 15]  # one segment per present class
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    with pytest.raises(FileNotFoundError, match="val.txt; data.val_fraction"):
        VocDataset(tmp_path, "val")


def test_unknown_value_and_missing_image_name_the_file(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "labels.txt").write_text("background\nperson\n")  # 15 and 12 are not classes now
    with pytest.raises(ValueError, match=r"SegmentationClass/2007_000001\.png contains unknown label value"):
        VocDataset(tmp_path, "train")[0]
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n2007_000002\n")
    with pytest.raises(FileNotFoundError, match=r"train\.txt: image '2007_000002' not found"):
        VocDataset(tmp_path, "train")


def test_build_dataset_finds_voc_under_vocdevkit(tmp_path):
    make_voc(tmp_path / "VOCdevkit" / "VOC2012")
    config = Config()
    config.data.dataset, config.data.root, config.data.augmentation = "voc", str(tmp_path / "VOCdevkit"), "none"
    dataset, labels = build_dataset(config, "train", train=True)
    assert len(dataset) == 1 and labels.num_classes == 21
