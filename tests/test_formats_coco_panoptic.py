import json

import numpy as np
import pytest
from PIL import Image

from mask2former.data.formats.coco_panoptic import CocoPanopticDataset, id_to_rgb, rgb_to_id

HEIGHT, WIDTH = 6, 5
SKY, PERSON_300, CROWD_70000 = 1, 300, 70000  # 300 = (44, 1, 0) and 70000 = (112, 17, 1): multi-byte ids


def segment_map():
    ids = np.zeros((HEIGHT, WIDTH), dtype=np.int64)  # 0 = void
    ids[0:2, :] = SKY
    ids[2:5, 0:2] = PERSON_300
    ids[3:6, 3:5] = CROWD_70000
    return ids


def write_fixture(tmp_path, ids=None, segments=None, categories=None, image_size=(HEIGHT, WIDTH), images=None):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "panoptic").mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8)).save(tmp_path / "images" / "x.jpg",
                                                                                   quality=100)
    Image.fromarray(id_to_rgb(segment_map() if ids is None else ids)).save(tmp_path / "panoptic" / "x.png")
    data = {
        "images": images or [{"id": 42, "file_name": "x.jpg", "height": image_size[0], "width": image_size[1]}],
        "annotations": [{"image_id": 42, "file_name": "x.png", "segments_info": segments or [
            {"id": SKY, "category_id": 7, "iscrowd": 0},
            {"id": PERSON_300, "category_id": 2, "iscrowd": 0},
            {"id": CROWD_70000, "category_id": 2, "iscrowd": 1},
        ]}],
        "categories": categories or [{"id": 2, "name": "person", "isthing": 1, "color": [220, 20, 60]},
                                     {"id": 7, "name": "sky", "isthing": 0, "color": [70, 130, 180]}],
    }
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps(data))
    return path


def test_id_encoding_by_hand():
    assert id_to_rgb(np.array(300)).tolist() == [44, 1, 0]
    assert id_to_rgb(np.array(70000)).tolist() == [112, 17, 1]
    assert rgb_to_id(np.array([44, 1, 0], dtype=np.uint8)) == 300
    assert rgb_to_id(np.array([255, 255, 255], dtype=np.uint8)) == 256 ** 3 - 1  # no uint8 overflow
    with pytest.raises(ValueError, match="2\\^24"):
        id_to_rgb(np.array([256 ** 3]))


def test_reads_segments_crowd_void_and_multibyte_ids(tmp_path):
    path = write_fixture(tmp_path)
    dataset = CocoPanopticDataset(path, tmp_path / "images", tmp_path / "panoptic")
    assert dataset.label_space.names == ["person", "sky"] and dataset.label_space.is_thing == [True, False]
    assert dataset.label_space.colors == [(220, 20, 60), (70, 130, 180)]
    sample = dataset[0]
    ids = segment_map()
    assert sample["labels"].tolist() == [1, 0, 0]
    assert sample["iscrowd"].tolist() == [False, False, True]
    for got, segment_id in zip(sample["masks"].numpy(), (SKY, PERSON_300, CROWD_70000)):
        assert np.array_equal(got, ids == segment_id)
    expected = np.full((HEIGHT, WIDTH), 255)
    expected[ids == SKY] = 1
    expected[(ids == PERSON_300) | (ids == CROWD_70000)] = 0  # crowd pixels carry their class in the semantic map
    assert np.array_equal(sample["semantic"].numpy(), expected)
    void = ~sample["masks"].any(0)
    assert np.array_equal(void.numpy(), ids == 0)
    assert sample["image_id"] == 42 and sample["orig_size"] == (HEIGHT, WIDTH)


def test_default_panoptic_root_is_json_without_suffix(tmp_path):
    path = write_fixture(tmp_path)
    (tmp_path / "panoptic").rename(path.with_suffix(""))
    assert len(CocoPanopticDataset(path, tmp_path / "images")[0]["labels"]) == 3


def test_png_id_missing_from_json(tmp_path):
    ids = segment_map()
    ids[5, 0] = 513
    path = write_fixture(tmp_path, ids=ids)
    with pytest.raises(ValueError, match=r"panoptic PNG .*x\.png: segment id 513 is in the PNG but not in segments_info of "
                                         r".*panoptic\.json"):
        CocoPanopticDataset(path, tmp_path / "images", tmp_path / "panoptic")[0]


def test_json_id_missing_from_png(tmp_path):
    segments = [{"id": SKY, "category_id": 7}, {"id": PERSON_300, "category_id": 2},
                {"id": CROWD_70000, "category_id": 2, "iscrowd": 1}, {"id": 9, "category_id": 2}]
    path = write_fixture(tmp_path, segments=segments)
    with pytest.raises(ValueError, match=r"segment id 9 of .*panoptic\.json is not in the PNG .*x\.png"):
        CocoPanopticDataset(path, tmp_path / "images", tmp_path / "panoptic")[0]


def test_unknown_category_id(tmp_path):
    segments = [{"id": SKY, "category_id": 8}]
    path = write_fixture(tmp_path, segments=segments)
    with pytest.raises(ValueError, match=r"panoptic\.json image id 42 segment 1: unknown category id 8\b"):
        CocoPanopticDataset(path, tmp_path / "images", tmp_path / "panoptic")


def test_annotation_for_missing_image(tmp_path):
    images = [{"id": 41, "file_name": "x.jpg", "height": HEIGHT, "width": WIDTH}]
    path = write_fixture(tmp_path, images=images)
    with pytest.raises(ValueError, match=r"panoptic\.json: panoptic annotation 'x\.png' refers to missing image id 42"):
        CocoPanopticDataset(path, tmp_path / "images", tmp_path / "panoptic")


def test_duplicate_segment_id(tmp_path):
    segments = [{"id": SKY, "category_id": 7}, {"id": SKY, "category_id": 2}]
    path = write_fixture(tmp_path, segments=segments)
    with pytest.raises(ValueError, match="segment 1: duplicate segment id"):
        CocoPanopticDataset(path, tmp_path / "images", tmp_path / "panoptic")


def test_png_size_differs_from_image(tmp_path):
    path = write_fixture(tmp_path, image_size=(HEIGHT, WIDTH + 2))
    with pytest.raises(ValueError, match=r"label .*x\.png is 5x6 \(WxH\) but its image .*x\.jpg is 7x6"):
        CocoPanopticDataset(path, tmp_path / "images", tmp_path / "panoptic")[0]


def test_missing_png(tmp_path):
    path = write_fixture(tmp_path)
    (tmp_path / "panoptic" / "x.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"label file not found: .*x\.png"):
        CocoPanopticDataset(path, tmp_path / "images", tmp_path / "panoptic")[0]
