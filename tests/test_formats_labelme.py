import base64
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from mask2former.config import Config
from mask2former.data.build import build_datasets
from mask2former.data.formats.labelme import LabelmeDataset

HEIGHT, WIDTH = 8, 10


def write_image(path, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def write_json(path, shapes, image_path="a.png", image_data=None, **extra):
    document = {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": image_path, "imageData": image_data,
                "imageHeight": HEIGHT, "imageWidth": WIDTH, **extra}
    path.write_text(json.dumps(document))


def shape(label, points, kind="polygon", group_id=None, **extra):
    return {"label": label, "points": points, "group_id": group_id, "shape_type": kind, "flags": {}, **extra}


def box(x0, y0, x1, y1):
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


def test_shapes_groups_paint_order_ignore_and_labels_txt(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    pixels = write_image(folder / "a.png")
    (tmp_path / "labels.txt").write_text("__ignore__\n_background_\ncat\ndog\n")  # above the folder
    write_json(folder / "a.json", [
        shape("dog", [[0, 0], [3, 0], [3, 2], [0, 2]]),                 # x 0..3, y 0..2 (outline included)
        shape("cat", [[2, 1], [5, 1]], kind="rectangle"),               # paints over the dog at (2..3, 1)
        shape("cat", [[7, 4], [7, 2]], kind="circle"),                  # radius 2: pixels with dist^2 <= 5
        shape("dog", [[0, 5], [1, 5], [1, 7], [0, 7]], group_id=3),     # two parts of one dog
        shape("dog", [[3, 6], [4, 6], [4, 7], [3, 7]], group_id=3),
        shape("__ignore__", [[0, 0], [0, 0]], kind="rectangle"),        # the pixel (0, 0) is ignored
        shape("dog", [[9, 0]], kind="point"),                           # no area: skipped and counted
    ])
    dataset = LabelmeDataset(folder)
    assert dataset.label_space.names == ["cat", "dog"] and dataset.label_space.is_thing == [True, True]
    sample = dataset[0]
    assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), pixels)
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    circle = (xs - 7) ** 2 + (ys - 4) ** 2 <= 5
    dog1 = box(0, 0, 3, 2) & ~box(2, 1, 5, 1)
    dog1[0, 0] = False
    grouped = box(0, 5, 1, 7) | box(3, 6, 4, 7)
    cat2 = circle & ~box(0, 0, 0, 0)
    expected = [(1, dog1), (0, box(2, 1, 5, 1)), (0, cat2), (1, grouped)]
    assert sample["labels"].tolist() == [label for label, _ in expected]
    for got, (_, mask) in zip(sample["masks"].numpy(), expected):
        assert np.array_equal(got, mask)
    semantic = np.full((HEIGHT, WIDTH), 255)
    for label, mask in expected:
        semantic[mask] = label
    assert np.array_equal(sample["semantic"].numpy(), semantic) and sample["semantic"][0, 0] == 255
    assert not sample["iscrowd"].any()
    assert dataset.counts.summary()["dog"] == {"read": 3, "skipped": {"point shapes (no area)": 1}}


def test_image_data_stuff_from_classes_yaml_and_classes_from_files(tmp_path):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    write_json(tmp_path / "b.json", [shape("sky", [[0, 0], [9, 1]], kind="rectangle"),
                                     shape("sky", [[0, 6], [9, 7]], kind="rectangle"),
                                     shape("car", [[4, 3], [6, 4]], kind="rectangle", flags={"iscrowd": True})],
               image_path="does-not-exist.png", image_data=encoded)
    dataset = LabelmeDataset(tmp_path)
    assert dataset.label_space.names == ["sky", "car"]  # the order the files name them
    sample = dataset[0]
    assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), pixels)
    assert sample["labels"].tolist() == [0, 0, 1]  # all things: two sky objects
    (tmp_path / "classes.yaml").write_text("classes:\n- {name: car, isthing: true}\n- {name: sky, isthing: false}\n")
    sample = LabelmeDataset(tmp_path)[0]
    assert sample["labels"].tolist() == [1, 0]  # sky is stuff now: one segment
    assert np.array_equal(sample["masks"][0].numpy(), box(0, 0, 9, 1) | box(0, 6, 9, 7))
    assert sample["iscrowd"].tolist() == [False, True]


@pytest.mark.parametrize("document, message", [
    ({"shapes": [], "imagePath": None, "imageData": None}, "neither 'imagePath' nor 'imageData'"),
    ({"shapes": [shape("cat", [[0, 0], [1, 1]])], "imagePath": "a.png"}, "shape 0: polygon with 2 point(s)"),
    ({"shapes": [shape("cat", [[0, 0], [1, 1], [1, 0]]), shape("cat", [[0, 0]], kind="blob")], "imagePath": "a.png"},
     "shape 1: unknown shape_type 'blob'"),
    ({"shapes": [shape("cat", [[0, 0], [1, 1]], kind="circle"), shape("dog", [[0, 0], [1, 1]], kind="rectangle")],
      "imagePath": "a.png"}, "shape 1: label 'dog' is not one of the classes"),
])
def test_bad_files_are_one_line_errors_naming_file_and_shape(tmp_path, document, message):
    (tmp_path / "labels.txt").write_text("cat\n")
    write_image(tmp_path / "a.png")
    (tmp_path / "x.json").write_text(json.dumps(document))
    with pytest.raises(ValueError) as error:
        LabelmeDataset(tmp_path)
    assert message in str(error.value) and str(tmp_path / "x.json") in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_image_names_the_json_and_the_path(tmp_path):
    write_json(tmp_path / "x.json", [shape("cat", [[0, 0], [2, 0], [2, 2]])], image_path="gone.png")
    with pytest.raises(FileNotFoundError, match=r"x\.json: image file not found: .*gone\.png"):
        LabelmeDataset(tmp_path)[0]


def test_single_folder_val_fraction_is_deterministic_and_logged(tmp_path, caplog):
    for index in range(10):
        write_image(tmp_path / f"{index}.png", seed=index)
        write_json(tmp_path / f"{index}.json", [shape("cat", [[0, 0], [2, 0], [2, 2]])], image_path=f"{index}.png")
    config = Config()
    config.data.dataset, config.data.root, config.data.val_fraction = "labelme", str(tmp_path), 0.3
    config.data.augmentation = "none"
    with caplog.at_level(logging.INFO, logger="mask2former.data"):
        train, val, label_space = build_datasets(config)
    assert (len(train), len(val)) == (7, 3) and label_space.names == ["cat"]
    assert "7 image(s) for training, 3 held out for validation" in caplog.text
    names = sorted(val.sample_keys())
    assert not set(names) & set(train.sample_keys())
    assert [val[i]["image_id"] for i in range(3)] == [name[:-5] for name in names]
    again = build_datasets(config)[1]
    assert sorted(again.sample_keys()) == names  # same seed: same split
    config.data.seed = 1
    other = [sorted(build_datasets(config)[1].sample_keys()) for config.data.seed in range(1, 6)]
    assert any(keys != names for keys in other)  # the seed picks the split
    # Without val_fraction, a single folder has no 'val' split: the error says what to do.
    config.data.val_fraction = 0.0
    with pytest.raises(FileNotFoundError, match="val_fraction"):
        build_datasets(config)


def test_mask_shape_is_placed_at_its_box(tmp_path):
    # labelme >= 5.3 writes a "mask" shape as its box corners and a PNG of the box (rows ymin..ymax, cols xmin..xmax).
    patch = np.array([[1, 0, 1], [1, 1, 0]], dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(patch * 255).save(buffer, format="PNG")
    write_image(tmp_path / "a.png")
    write_json(tmp_path / "a.json", [shape("cat", [[4, 2], [6, 3]], kind="mask",
                                           mask=base64.b64encode(buffer.getvalue()).decode("ascii"))])
    expected = np.zeros((HEIGHT, WIDTH), dtype=bool)
    expected[2:4, 4:7] = patch.astype(bool)
    assert np.array_equal(LabelmeDataset(tmp_path)[0]["masks"][0].numpy(), expected)


def test_image_path_from_another_machine_falls_back_to_the_name_beside_the_json(tmp_path):
    pixels = write_image(tmp_path / "a.png")
    write_json(tmp_path / "a.json", [shape("cat", [[0, 0], [2, 0], [2, 2]])], image_path="C:\\Users\\me\\data\\a.png")
    assert np.array_equal(LabelmeDataset(tmp_path)[0]["image"].permute(1, 2, 0).numpy(), pixels)


def test_splits_without_labels_txt_share_the_classes_named_in_all_of_them(tmp_path):
    for split, labels in (("train", ["cat"]), ("val", ["dog", "cat"])):
        (tmp_path / split).mkdir()
        write_image(tmp_path / split / "a.png")
        write_json(tmp_path / split / "a.json", [shape(label, [[3 * i, 0], [3 * i + 2, 0], [3 * i + 2, 2]])
                                                 for i, label in enumerate(labels)])
    config = Config()
    config.data.dataset, config.data.root, config.data.augmentation = "labelme", str(tmp_path), "none"
    train, val, label_space = build_datasets(config)
    assert label_space.names == ["cat", "dog"] and val.label_space == label_space  # train's files first
    assert val[0]["labels"].tolist() == [1, 0]
