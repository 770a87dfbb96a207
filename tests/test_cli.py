import json

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.cli import main
from mask2former.data import FashionScenes
from mask2former.modeling.model import Mask2Former

from test_train import TINY, train_tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model trained for 2 steps by `mask2former train` itself."""
    out = tmp_path_factory.mktemp("run")
    train_tiny(out)
    assert (out / "curves.png").exists() and len(list((out / "overlays").glob("*.png"))) == 2
    return out / "model_final"


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(FashionScenes("val", num_images=1, image_size=64)[0]["image"].permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_predict_writes_overlays_and_results(checkpoint, image_file, tmp_path, task):
    assert main(["predict", str(image_file), "--checkpoint", str(checkpoint), "--task", task, "--out", str(tmp_path)]) == 0
    overlay = Image.open(tmp_path / f"scene_{task}.png")
    assert overlay.mode == "RGB" and overlay.size[0] >= 64 and overlay.size[1] >= 64
    written = sorted(path.name for path in tmp_path.iterdir() if path.name != ".predict")  # .predict: resume records
    expected = {"panoptic": ["panoptic", "panoptic.json", "scene_panoptic.png", "summary.json"],
                "instance": ["instances.json", "scene_instance.png", "summary.json"],
                "semantic": ["scene_semantic.png", "semantic", "summary.json"]}
    assert written == expected[task]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["images"][0]["image_id"] == "scene"
    assert summary["images"][0]["height"] == 64 and summary["images"][0]["width"] == 64
    if task == "panoptic":
        results = json.loads((tmp_path / "panoptic.json").read_text())["annotations"]
        assert results[0]["image_id"] == "scene" and results[0]["file_name"] == "scene.png"
        ids = np.asarray(Image.open(tmp_path / "panoptic" / "scene.png"), dtype=np.uint32)
        segment_ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        # Every painted id is listed in the JSON (COCO panoptic rule) and vice versa.
        assert set(np.unique(segment_ids)) - {0} == {s["id"] for s in results[0]["segments_info"]}
    elif task == "instance":
        results = json.loads((tmp_path / "instances.json").read_text())  # the COCO results list
        assert results and all(1 <= inst["category_id"] <= 10 for inst in results)  # things only
        assert all(set(inst) == {"image_id", "category_id", "segmentation", "score", "bbox"} for inst in results)
    else:
        assert np.asarray(Image.open(tmp_path / "semantic" / "scene.png")).max() < 13


def test_evaluate_prints_metrics_and_writes_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--checkpoint", str(checkpoint), "data.num_val_images=2", "data.image_size=64", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "PQ" in printed and "mIoU" in printed
    metrics = json.loads(out.read_text())["metrics"]
    assert {"PQ", "AP", "mIoU"} <= set(metrics)


def test_export_and_predict_with_onnx(checkpoint, image_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(onnx_path), "--height", "64", "--width", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(check["max_abs_diff_masks"] < 1e-3 for check in report["checks"])
    assert main(["predict", str(image_file), "--onnx", str(onnx_path), "--task", "semantic", "--out", str(tmp_path / "p")]) == 0
    torch_out = tmp_path / "t"
    assert main(["predict", str(image_file), "--checkpoint", str(checkpoint), "--task", "semantic", "--out", str(torch_out)]) == 0
    onnx_ids = np.asarray(Image.open(tmp_path / "p" / "semantic" / "scene.png"))
    torch_ids = np.asarray(Image.open(torch_out / "semantic" / "scene.png"))
    assert (onnx_ids == torch_ids).mean() > 0.99


def test_data_export_round_trip(tmp_path):
    from mask2former.config import load_config
    from mask2former.data.build import build_dataset

    assert main(["data", "export", "fashion-scenes", str(tmp_path), "--num-images", "2", "--seed", "3"]) == 0
    config = load_config("fashion_scenes_lite0", ["data.dataset=coco_panoptic", f"data.root={tmp_path}"])
    dataset, _ = build_dataset(config, "val", train=False)  # detectron2's layout: data.root alone reads it
    assert len(dataset) == 2
    original = FashionScenes("val", num_images=2, seed=3)[1]
    read_back = dataset[1]
    assert torch.equal(read_back["image"], original["image"]) and torch.equal(read_back["semantic"], original["semantic"])


def test_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.png"), "--checkpoint", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("mask2former predict: error:") and "\n" not in error and "nope" in error
    assert main(["train", "model.num_querys=3"]) == 1
    assert "unknown config key model.num_querys" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    model_dir = tmp_path / "m"
    Mask2Former(load_tiny_config()).save_pretrained(model_dir)
    assert main(["predict", str(broken), "--checkpoint", str(model_dir), "--out", str(tmp_path / "out")]) == 1
    assert "broken.png" in capsys.readouterr().err


def load_tiny_config():
    from mask2former.config import load_config

    return load_config("fashion_scenes_lite0", TINY).model


def test_evaluate_saves_standard_files_that_score_the_same(checkpoint, tmp_path, capsys):
    """export -> evaluate --save-predictions -> evaluate --predictions gives identical metrics; pycocotools and
    panopticapi read the saved files as they are; predict (fp32, as evaluate) writes the same files."""
    from test_results_files import mask_ap, panoptic_quality

    data = tmp_path / "data"
    assert main(["data", "export", "fashion-scenes", str(data), "--num-images", "3", "--seed", "1"]) == 0
    dataset_args = ["data.dataset=coco_panoptic", f"data.root={data}"]
    saved, first, second = tmp_path / "saved", tmp_path / "m1.json", tmp_path / "m2.json"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), *dataset_args, "--save-predictions", str(saved),
                 "--out", str(first)]) == 0
    assert "precision: fp32" in capsys.readouterr().out
    assert main(["evaluate", "--predictions", str(saved), *dataset_args, "--out", str(second)]) == 0
    metrics = json.loads(first.read_text())["metrics"]
    assert json.loads(second.read_text())["metrics"] == metrics
    assert metrics["PQ"] == pytest.approx(100.0 * panoptic_quality(data, saved, "val")["All"]["pq"], abs=1e-9)
    assert metrics["AP"] == pytest.approx(mask_ap(data, saved, "val"), abs=1e-9)
    # predict on the exported image files: numeric stems are the COCO image ids
    images = sorted(str(path) for path in (data / "val").glob("*.png"))
    predicted = tmp_path / "predicted"
    for task in ("panoptic", "instance", "semantic"):
        assert main(["predict", *images, "--checkpoint", str(checkpoint), "--task", task, "--out", str(predicted)]) == 0
    assert "precision fp32" in capsys.readouterr().out
    third = tmp_path / "m3.json"
    assert main(["evaluate", "--predictions", str(predicted), *dataset_args, "--out", str(third)]) == 0
    predicted_metrics = json.loads(third.read_text())["metrics"]
    assert predicted_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert predicted_metrics[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_predict_takes_image_ids_from_a_coco_json(checkpoint, image_file, tmp_path, capsys):
    coco_json = tmp_path / "images.json"
    coco_json.write_text(json.dumps({"images": [{"id": 42, "file_name": "val/scene.png"}], "categories": []}))
    out = tmp_path / "out"
    assert main(["predict", str(image_file), "--checkpoint", str(checkpoint), "--task", "instance", "--out", str(out),
                 "--coco-json", str(coco_json)]) == 0
    assert {result["image_id"] for result in json.loads((out / "instances.json").read_text())} == {42}
    other = tmp_path / "other.png"
    other.write_bytes(image_file.read_bytes())
    assert main(["predict", str(other), "--checkpoint", str(checkpoint), "--coco-json", str(coco_json)]) == 1
    error = capsys.readouterr().err
    assert "images.json" in error and "'other.png'" in error
