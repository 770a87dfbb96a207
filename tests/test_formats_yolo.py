import logging

import numpy as np
import pytest
from PIL import Image

from mask2former.config import Config
from mask2former.data.build import build_dataset
from mask2former.data.formats.yolo import YoloDataset
from mask2former.data.holdout import holdout_indices

HEIGHT, WIDTH = 8, 10


def norm(x, y):
    """Normalised coordinates of the centre of pixel (x, y), as the exporter writes them."""
    return f"{(x + 0.5) / WIDTH:.6f} {(y + 0.5) / HEIGHT:.6f}"


def make_dataset(root, lines_a, names="names: [cat, dog]\n", split_key="train: images/train\n"):
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / "images" / "train" /
                                                                                       f"{name}.png")
    (root / "labels" / "train" / "a.txt").write_text("\n".join(lines_a) + "\n")  # b.png has no label file
    (root / "data.yaml").write_text(names + split_key)
    return root / "data.yaml"


def test_polygons_classes_overlap_and_background_images(tmp_path, caplog):
    square = " ".join(norm(x, y) for x, y in [(2, 1), (5, 1), (5, 3), (2, 3)])       # x 2..5, y 1..3
    triangle = " ".join(norm(x, y) for x, y in [(4, 3), (8, 3), (4, 7)])             # right angle at (4, 3)
    edges = "0 0 1 0 1 1 0 1"  # the image's outer edges: the whole image
    with caplog.at_level(logging.INFO, logger="mask2former.data"):
        dataset = YoloDataset(make_dataset(tmp_path, [f"1 {square}", "", f"0 {triangle}"]), "train")
    assert dataset.label_space.names == ["cat", "dog"] and dataset.label_space.is_thing == [True, True]
    assert "1 of 2 image(s) have no label file" in caplog.text
    assert dataset.counts.summary() == {"dog": {"read": 1, "skipped": {}}, "cat": {"read": 1, "skipped": {}}}
    sample = dataset[0]
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    square_mask = (xs >= 2) & (xs <= 5) & (ys >= 1) & (ys <= 3)
    triangle_mask = (xs >= 4) & (ys >= 3) & ((xs - 4) + (ys - 3) <= 4)
    assert sample["labels"].tolist() == [1, 0]
    assert np.array_equal(sample["masks"][0].numpy(), square_mask)
    assert np.array_equal(sample["masks"][1].numpy(), triangle_mask)
    semantic = np.full((HEIGHT, WIDTH), 255)
    semantic[square_mask] = 1
    semantic[triangle_mask] = 0  # later lines paint over earlier ones (they overlap at (4..5, 3))
    assert np.array_equal(sample["semantic"].numpy(), semantic)
    assert dataset[1]["labels"].numel() == 0 and (dataset[1]["semantic"] == 255).all()
    (tmp_path / "labels" / "train" / "a.txt").write_text(f"0 {edges}\n")
    assert YoloDataset(tmp_path / "data.yaml", "train")[0]["masks"].all()


def test_names_as_mapping(tmp_path):
    dataset = YoloDataset(make_dataset(tmp_path, [f"3 {norm(0, 0)} {norm(2, 0)} {norm(0, 2)}"],
                                       names="names: {0: cat, 3: dog}\n"), "train")
    assert dataset.label_space.names == ["cat", "dog"] and dataset.label_space.dataset_ids == [0, 3]
    assert dataset[0]["labels"].tolist() == [1]


@pytest.mark.parametrize("line, message", [
    ("0 0.1 0.1 0.5 0.5 0.2", "line 2: odd number of coordinates (5)"),
    ("0 0.1 0.1 0.5 0.5 1.2 0.2", "line 2: coordinate 1.2 is outside [0, 1]"),
    ("0 0.1 0.1 0.5 -0.01 0.9 0.2", "line 2: coordinate -0.01 is outside [0, 1]"),
    ("2 0.1 0.1 0.5 0.5 0.9 0.2", "line 2: class id 2 is not in data.yaml's names"),
    ("0 0.5 0.5 0.2 0.2", "line 2: 2 point(s)"),
    ("cat 0.1 0.1 0.5 0.5 0.9 0.2", "line 2: expected 'class x1 y1"),
])
def test_bad_lines_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
    path = make_dataset(tmp_path, ["1 0.1 0.1 0.5 0.5 0.9 0.2", line])
    with pytest.raises(ValueError) as error:
        YoloDataset(path, "train")
    assert message in str(error.value) and str(tmp_path / "labels" / "train" / "a.txt") in str(error.value)
    assert "\n" not in str(error.value)


def test_tolerance_and_missing_split_and_missing_listed_image(tmp_path):
    path = make_dataset(tmp_path, ["0 -0.0000005 0 1.0000005 0 1 1"])  # float rounding within 1e-6 is accepted
    assert YoloDataset(path, "train")[0]["labels"].tolist() == [0]
    with pytest.raises(ValueError, match="no 'val' split.*val_fraction"):
        YoloDataset(path, "val")
    (tmp_path / "list.txt").write_text("./images/train/a.png\n./images/train/gone.png\n")
    path.write_text("names: [cat, dog]\ntrain: list.txt\n")
    with pytest.raises(FileNotFoundError, match=r"list\.txt line 2: image file not found: .*gone\.png"):
        YoloDataset(path, "train")
    config = Config()
    config.data.dataset, config.data.root, config.data.augmentation = "yolo", str(tmp_path), "none"
    (tmp_path / "list.txt").write_text("./images/train/a.png\n")
    dataset, labels = build_dataset(config, "train", train=True)
    assert len(dataset) == 1 and labels.names == ["cat", "dog"]


def test_holdout_is_stable_under_file_order_and_seeded():
    keys = [f"img{index}.jpg" for index in range(50)]
    train, val = holdout_indices(keys, 0.2, seed=0)
    assert len(val) == 10 and sorted(train + val) == list(range(50))
    shuffled = list(np.random.default_rng(0).permutation(keys))
    _, val_shuffled = holdout_indices(shuffled, 0.2, seed=0)
    assert sorted(shuffled[i] for i in val_shuffled) == sorted(keys[i] for i in val)
    assert {keys[i] for i in holdout_indices(keys, 0.2, seed=1)[1]} != {keys[i] for i in val}
    with pytest.raises(ValueError, match="val_fraction"):
        holdout_indices(keys, 1.0, seed=0)
