"""Standard results files: what ``evaluate --save-predictions`` / ``predict`` write is scored by the standard tools
themselves (pycocotools ``loadRes`` + ``COCOeval``, panopticapi's algorithm as shipped in cityscapesscripts) exactly
as ``evaluate --predictions`` scores it, on FashionScenes exported with ``data export`` and read with ``data.root``."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.cli import main
from mask2former.config import load_config
from mask2former.data import FashionScenes
from mask2former.data.build import build_dataset
from mask2former.data.export import export_fashion_scenes
from mask2former.evaluation.evaluator import evaluate_predictions
from mask2former.evaluation.results_files import ResultsWriter, file_stem

# The oracles: panopticapi (as shipped in cityscapesscripts) and pycocotools, as scripts/ runs them for users.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from score_with_standard_tools import mask_ap, panoptic_quality  # noqa: E402

NUM_IMAGES = 5


def _config(root, dataset):
    return load_config("fashion_scenes_lite0", [f"data.dataset={dataset}", f"data.root={root}"])


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    export_fashion_scenes(root, "coco-panoptic", "val", NUM_IMAGES, seed=5, image_size=(64, 80), source="subset")
    return root


def _shift(mask, dy, dx):
    return np.roll(np.roll(mask, dy, axis=0), dx, axis=1)


def fake_results(sample, label_space, rng, exact):
    """Ground truth turned into predictions: exact, or with shifted masks, swapped/dropped classes, random scores."""
    labels = sample["labels"].tolist()
    masks = sample["masks"].numpy()
    height, width = masks.shape[-2:]
    things = [i for i, label in enumerate(labels) if label_space.is_thing[label]]
    # panoptic: a disjoint map; stuff of one class is one segment, as the post-processing makes it
    segment_map = np.zeros((height, width), np.int32)
    segments = []
    for position, (label, mask) in enumerate(zip(labels, masks)):
        if not exact:
            if rng.random() < 0.2:
                continue  # missed
            mask = _shift(mask, int(rng.integers(-3, 4)), int(rng.integers(-3, 4))) & (segment_map == 0)
            if rng.random() < 0.2:
                label = int(rng.choice(label_space.thing_ids if label_space.is_thing[label] else label_space.stuff_ids))
            if not mask.any():
                continue
        segment_id = len(segments) + 1
        segment_map[mask & (segment_map == 0)] = segment_id
        segments.append({"id": segment_id, "category_id": label, "isthing": label_space.is_thing[label], "score": 0.9})
    present = set(np.unique(segment_map).tolist())
    segments = [s for s in segments if s["id"] in present]
    # instance: the thing masks, shifted, with scores (and a false positive)
    inst_masks, inst_labels = [], []
    for i in things:
        mask = masks[i] if exact else _shift(masks[i], int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
        inst_masks.append(mask)
        inst_labels.append(labels[i] if exact or rng.random() > 0.2 else int(rng.choice(label_space.thing_ids)))
    if not exact:
        extra = np.zeros((height, width), bool)
        extra[5:20, 10:30] = True
        inst_masks.append(extra)
        inst_labels.append(int(rng.choice(label_space.thing_ids)))
    scores = rng.random(len(inst_masks)).astype(np.float32) * 0.9 + 0.05
    instance = {"masks": torch.from_numpy(np.array(inst_masks, bool).reshape(-1, height, width)),
                "labels": torch.tensor(inst_labels, dtype=torch.int64), "scores": torch.from_numpy(scores)}
    # semantic: ground truth with ignore filled in, and a band of wrong classes
    semantic = sample["semantic"].clone()
    semantic[semantic == label_space.ignore_index] = 0
    if not exact:
        semantic[: height // 4] = int(rng.integers(0, label_space.num_classes))
    return {"panoptic": (torch.from_numpy(segment_map), segments), "instance": instance, "semantic": semantic}


def write_fake(dataset, label_space, out, exact, seed=0, tasks=("panoptic", "instance", "semantic")):
    rng = np.random.default_rng(seed)
    writer = ResultsWriter(out, label_space, tasks)
    for index in range(len(dataset)):
        sample = dataset[index]
        writer.add(sample["image_id"], file_stem(sample["image_id"], sample["file_name"]),
                   fake_results(sample, label_space, rng, exact))
    return writer.close()


@pytest.mark.parametrize("exact", [True, False])
def test_saved_files_scored_by_the_standard_tools(coco_root, tmp_path, exact):
    config = _config(coco_root, "coco_panoptic")
    dataset, label_space = build_dataset(config, "val", train=False)
    assert len(dataset) == NUM_IMAGES
    write_fake(dataset, label_space, tmp_path, exact, seed=1)
    metrics = evaluate_predictions(str(tmp_path), config)["metrics"]
    expected = panoptic_quality(coco_root, tmp_path, "val")
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        assert metrics["PQ" + suffix] == pytest.approx(100.0 * expected[group]["pq"], abs=1e-9)
        assert metrics["SQ" + suffix] == pytest.approx(100.0 * expected[group]["sq"], abs=1e-9)
    assert metrics["AP"] == pytest.approx(mask_ap(coco_root, tmp_path, "val"), abs=1e-9)
    if exact:
        assert metrics["PQ"] == pytest.approx(100.0) and metrics["AP"] == pytest.approx(100.0)
        assert metrics["mIoU"] == pytest.approx(100.0)
    else:
        assert 20.0 < metrics["PQ"] < 95.0 and 5.0 < metrics["AP"] < 95.0 and metrics["mIoU"] < 95.0


def test_semantic_pngs_hold_the_dataset_values(tmp_path):
    """ADE20K-style data (PNG value = class + 1, 0 = ignore): predictions are written in the same values."""
    root = tmp_path / "ade"
    generated = FashionScenes("val", 3, seed=2, image_size=48)
    scenes = [generated[i] for i in range(3)]
    for split_dir in ("images/validation", "annotations/validation"):
        (root / split_dir).mkdir(parents=True)
    names = FashionScenes.label_space.names
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "".join(
        f"{i + 1}\t0\t0\t0\t{name}\n" for i, name in enumerate(names)))
    for index, sample in enumerate(scenes):
        Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(root / "images/validation" / f"a{index}.png")
        raw = np.where(sample["semantic"].numpy() == 255, 0, sample["semantic"].numpy() + 1).astype(np.uint8)
        Image.fromarray(raw).save(root / "annotations/validation" / f"a{index}.png")
    config = load_config("fashion_scenes_lite0", ["data.dataset=ade20k", f"data.root={root}", "data.val_split=validation"])
    dataset, label_space = build_dataset(config, "validation", train=False)
    out = tmp_path / "pred"
    write_fake(dataset, label_space, out, exact=True, tasks=("semantic",))
    for index in range(3):
        gt = np.asarray(Image.open(root / "annotations/validation" / f"a{index}.png"))
        pred = np.asarray(Image.open(out / "semantic" / f"a{index}.png"))
        assert (pred[gt > 0] == gt[gt > 0]).all() and pred.min() >= 1  # the data set's values, 0 never predicted
    metrics = evaluate_predictions(str(out), config)["metrics"]
    assert metrics["mIoU"] == pytest.approx(100.0) and set(metrics) == {"mIoU", "fwIoU", "mACC", "pACC"}


def test_predictions_folder_errors_name_file_and_id(coco_root, tmp_path, capsys):
    config = _config(coco_root, "coco_panoptic")
    dataset, label_space = build_dataset(config, "val", train=False)
    write_fake(dataset, label_space, tmp_path / "good", exact=True)

    def broken(name, edit):
        folder = tmp_path / name
        folder.mkdir()
        for task in ("panoptic", "semantic"):
            (folder / task).mkdir()
            for png in (tmp_path / "good" / task).iterdir():
                (folder / task / png.name).write_bytes(png.read_bytes())
        panoptic = json.loads((tmp_path / "good" / "panoptic.json").read_text())
        instances = json.loads((tmp_path / "good" / "instances.json").read_text())
        edit(folder, panoptic, instances)
        (folder / "panoptic.json").write_text(json.dumps(panoptic))
        (folder / "instances.json").write_text(json.dumps(instances))
        return folder

    def fails(folder, *needles):
        code = main(["evaluate", "--predictions", str(folder), "data.dataset=coco_panoptic", f"data.root={coco_root}"])
        error = capsys.readouterr().err.strip()
        assert code == 1 and "\n" not in error, error
        for needle in needles:
            assert str(needle) in error, (needle, error)

    first = json.loads((tmp_path / "good" / "panoptic.json").read_text())["annotations"][0]
    folder = broken("missing_png", lambda f, p, i: (f / "panoptic" / first["file_name"]).unlink())
    fails(folder, first["file_name"], f"image id {first['image_id']}", "not found")
    fails(broken("unknown_category", lambda f, p, i: p["annotations"][0]["segments_info"][0].update(category_id=77)),
          "panoptic.json", "77", f"image id {first['image_id']}")
    fails(broken("unknown_instance_category", lambda f, p, i: i[0].update(category_id=12)),  # a stuff class
          "instances.json", "category id 12")
    fails(broken("unknown_image", lambda f, p, i: p["annotations"][0].update(image_id=999)),
          "panoptic.json", "image id 999", "not in the ground truth")
    fails(broken("unknown_instance_image", lambda f, p, i: i[0].update(image_id=998)),
          "instances.json", "image id 998", "not in the ground truth")

    def drop_segment(f, p, i):
        p["annotations"][0]["segments_info"].pop()
    segment = first["segments_info"][-1]["id"]
    fails(broken("unlisted_segment", drop_segment), first["file_name"], f"segment id {segment}", "not in segments_info")

    def extra_segment(f, p, i):
        p["annotations"][0]["segments_info"].append({"id": 4242, "category_id": 1})
    fails(broken("absent_segment", extra_segment), "segment id 4242", "not in the PNG")
    semantic_png = next((tmp_path / "good" / "semantic").iterdir()).name
    fails(broken("missing_semantic", lambda f, p, i: (f / "semantic" / semantic_png).unlink()), semantic_png,
          "not found")

    def bad_value(f, p, i):
        Image.fromarray(np.full((64, 80), 200, np.uint8)).save(f / "semantic" / semantic_png)
    fails(broken("bad_semantic_value", bad_value), semantic_png, "unknown category id(s) [200]")


def test_data_extra_overrides_merge_key_by_key(coco_root):
    config = load_config("fashion_scenes_lite0", [
        "data.dataset=coco_panoptic", "data.root=/nowhere",
        f"data.extra.val_annotations={coco_root}/annotations/panoptic_val.json",
        f"data.extra.val_images={coco_root}/val", f"data.extra.val_panoptic={coco_root}/panoptic_val"])
    assert set(config.data.extra) == {"val_annotations", "val_images", "val_panoptic"}
    dataset, _ = build_dataset(config, "val", train=False)
    assert len(dataset) == NUM_IMAGES
