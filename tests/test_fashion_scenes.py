import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_fill_holes
from torch.utils.data import DataLoader

from mask2former.data import fashion_mnist
from mask2former.data.collate import collate
from mask2former.data.fashion_scenes import TEXTURES, FashionScenes, fashion_scenes_label_space

SOURCES = ["subset", pytest.param("full", marks=pytest.mark.skipif(not fashion_mnist.full_available(),
                                                                   reason="dataset-fashion-mnist not installed"))]


def test_label_space():
    space = fashion_scenes_label_space()
    assert space.num_classes == 13 and space.thing_ids == list(range(10)) and space.stuff_ids == [10, 11, 12]
    assert space.names[0] == "T-shirt/top" and space.names[9] == "Ankle boot" and space.names[10:] == list(TEXTURES)
    assert space.dataset_ids == list(range(1, 14))
    assert FashionScenes.label_space == space


@pytest.mark.parametrize("source", SOURCES)
def test_sample_format_and_exact_labels(source):
    dataset = FashionScenes("train", num_images=6, seed=3, image_size=(64, 80), source=source)
    assert dataset.source == source
    for index in range(len(dataset)):
        sample = dataset[index]
        image, masks, labels, semantic = sample["image"], sample["masks"], sample["labels"], sample["semantic"]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 64, 80)
        assert masks.dtype == torch.bool and labels.dtype == torch.int64 and semantic.dtype == torch.int64
        assert sample["iscrowd"].dtype == torch.bool and not sample["iscrowd"].any()
        assert sample["image_id"] == index and sample["orig_size"] == (64, 80)
        assert bool(masks.flatten(1).any(1).all())  # no empty segment
        assert int(masks.sum(0).max()) == 1 and int(masks.sum(0).min()) == 1  # disjoint and covering: no void
        for label, mask in zip(labels, masks):
            assert bool((semantic[mask] == label).all())
        things, stuff = labels[labels < 10], labels[labels >= 10]
        assert 1 <= len(things) <= 10 and 1 <= len(stuff) <= 3
        assert labels.tolist() == things.tolist() + sorted(set(stuff.tolist()))  # things first, stuff once each


def test_same_seed_and_index_give_the_same_bytes():
    first = FashionScenes("val", num_images=8, seed=11, image_size=64, source="subset")
    second = FashionScenes("val", num_images=8, seed=11, image_size=64, source="subset")
    late = second[5]  # generated without generating 0-4 first
    early = [first[index] for index in range(6)][5]
    for key in ("image", "labels", "masks", "semantic"):
        assert early[key].numpy().tobytes() == late[key].numpy().tobytes()
    other_seed = FashionScenes("val", num_images=8, seed=12, image_size=64, source="subset")[5]
    other_split = FashionScenes("test", num_images=8, seed=11, image_size=64, source="subset")[5]
    assert not torch.equal(other_seed["image"], early["image"])
    assert not torch.equal(other_split["image"], early["image"])


def test_worker_count_does_not_change_samples():
    dataset = FashionScenes("train", num_images=6, seed=5, image_size=48, source="subset")
    serial = list(DataLoader(dataset, batch_size=2, num_workers=0, collate_fn=collate))
    parallel = list(DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate))
    for left, right in zip(serial, parallel):
        assert torch.equal(left["images"], right["images"])
        for a, b in zip(left["targets"], right["targets"]):
            assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])


def test_fully_hidden_items_are_dropped():
    # big items on a small canvas: later items often cover earlier ones completely
    dataset = FashionScenes("train", num_images=12, seed=0, image_size=32, source="subset", min_items=10, max_items=10,
                            item_scale=(0.8, 1.0))
    hidden_total = 0
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        visible = [item for item in scene.items if item.visible]
        hidden_total += len(scene.items) - len(visible)
        assert len(scene.items) == 10 and scene.items[-1].visible  # the top item is never hidden
        assert int((scene.labels < 10).sum()) == len(visible)
        assert [item.label for item in visible] == scene.labels[scene.labels < 10].tolist()
        assert scene.masks.reshape(len(scene.masks), -1).any(1).all()
    assert hidden_total > 0


def test_item_mask_rule_for_unoccluded_top_item():
    dataset = FashionScenes("val", num_images=3, seed=2, image_size=96, source="subset")
    pool = fashion_mnist.load_items("t10k", "subset")
    for index in range(3):
        scene = dataset.scene(index)
        top = scene.items[-1]
        position = int(np.nonzero(pool.indices == top.source_index)[0][0])
        y, x, height, width = top.box
        gray = np.asarray(Image.fromarray(pool.images[position]).resize((width, height), Image.BILINEAR))
        expected = np.zeros(dataset.image_size, dtype=bool)
        expected[y:y + height, x:x + width] = binary_fill_holes(gray > 10)
        top_mask = scene.masks[int((scene.labels < 10).sum()) - 1]
        assert np.array_equal(top_mask, expected)
        assert pool.labels[position] == top.label


@pytest.mark.parametrize("source", SOURCES)
def test_train_val_test_are_disjoint(source):
    scenes = {split: FashionScenes(split, num_images=10, seed=0, image_size=64, source=source)
              for split in ("train", "val", "test")}
    items = {split: [item for index in range(10) for item in dataset.scene(index).items]
             for split, dataset in scenes.items()}
    assert {item.source_split for item in items["train"]} == {"train"}
    assert {item.source_split for item in items["val"] + items["test"]} == {"t10k"}
    assert max(item.source_index for item in items["val"]) < 5000
    assert min(item.source_index for item in items["test"]) >= 5000
    for split, dataset in scenes.items():
        for index in range(10):
            for crop in dataset.scene(index).regions:
                top, left, height, width = crop.box
                if split == "train":
                    assert left + width <= 256  # left half of every 512-wide texture
                else:
                    assert left >= 256
                assert top + height <= 512


def test_subset_is_used_without_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("MASK2FORMER_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    assert not fashion_mnist.full_available()
    dataset = FashionScenes("train", num_images=2, image_size=48)
    assert dataset.source == "subset" and dataset[1]["masks"].shape[0] > 0
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        FashionScenes("train", num_images=2, source="full")


def test_shipped_subset():
    train = fashion_mnist.load_items("train", "subset")
    t10k = fashion_mnist.load_items("t10k", "subset")
    assert train.images.shape == (2000, 28, 28) and t10k.images.shape == (1000, 28, 28)
    assert np.bincount(train.labels, minlength=10).tolist() == [200] * 10
    assert (t10k.indices < 5000).sum() == 500 and np.bincount(t10k.labels[t10k.indices >= 5000]).tolist() == [50] * 10
    if fashion_mnist.full_available():  # the subset holds the real items at their original indices
        full = fashion_mnist.load_items("train", "full")
        assert np.array_equal(full.images[train.indices], train.images)
        assert np.array_equal(full.labels[train.indices], train.labels)
        full = fashion_mnist.load_items("t10k", "full")
        assert np.array_equal(full.images[t10k.indices], t10k.images)


def test_read_idx_rejects_bad_files(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="expected 5 values"):
        fashion_mnist.read_idx(path)
    path.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not a uint8 IDX file"):
        fashion_mnist.read_idx(path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        FashionScenes("validation", source="subset")
    with pytest.raises(ValueError, match="source must be"):
        FashionScenes("train", source="web")
    with pytest.raises(ValueError, match="min_items"):
        FashionScenes("train", source="subset", min_items=3, max_items=2)
    with pytest.raises(IndexError):
        FashionScenes("train", num_images=2, source="subset")[2]
