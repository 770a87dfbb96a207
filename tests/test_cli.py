import json

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.cli import main
from mask2former.data import FashionScenes
from mask2former.modeling.model import Mask2Former

from test_train import TINY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model trained for 2 steps by `mask2former train` itself."""
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["train", *TINY, f"train.output_dir={out}"]) == 0
    torch.set_num_threads(threads)
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
    written = sorted(path.name for path in tmp_path.iterdir())
    expected = {"panoptic": ["results_panoptic.json", "scene_panoptic.png", "scene_panoptic_ids.png"],
                "instance": ["results_instance.json", "scene_instance.png"],
                "semantic": ["results_semantic.json", "scene_semantic.png", "scene_semantic_ids.png"]}
    assert written == expected[task]
    results = json.loads((tmp_path / f"results_{task}.json").read_text())
    assert results[0]["height"] == 64 and results[0]["width"] == 64
    if task == "panoptic":
        assert results[0]["panoptic_png"] == "scene_panoptic_ids.png"
        ids = np.asarray(Image.open(tmp_path / "scene_panoptic_ids.png"), dtype=np.uint32)
        segment_ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        # Every painted id is listed in the JSON (COCO panoptic rule) and vice versa.
        assert set(np.unique(segment_ids)) - {0} == {s["id"] for s in results[0]["segments_info"]}
    elif task == "instance":
        assert all(1 <= inst["category_id"] <= 10 for inst in results[0]["instances"])  # things only
    else:
        assert np.asarray(Image.open(tmp_path / "scene_semantic_ids.png")).max() < 13


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
    onnx_ids = np.asarray(Image.open(tmp_path / "p" / "scene_semantic_ids.png"))
    torch_ids = np.asarray(Image.open(torch_out / "scene_semantic_ids.png"))
    assert (onnx_ids == torch_ids).mean() > 0.99


def test_data_export_round_trip(tmp_path):
    from mask2former.data.formats.coco_panoptic import CocoPanopticDataset

    assert main(["data", "export", "fashion-scenes", str(tmp_path), "--num-images", "2", "--seed", "3"]) == 0
    dataset = CocoPanopticDataset(tmp_path / "panoptic_val.json", tmp_path / "images" / "val")
    assert len(dataset) == 2
    original = FashionScenes("val", num_images=2, seed=3)[1]
    read_back = dataset[1]
    assert torch.equal(read_back["image"], original["image"]) and torch.equal(read_back["semantic"], original["semantic"])


def test_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.png"), "--checkpoint", str(tmp_path / "nope")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("mask2former predict: error:") and "\n" not in error and "nope" in error
    assert main(["train", "model.num_querys=3"]) == 1
    assert "unknown config key model.num_querys" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    model_dir = tmp_path / "m"
    Mask2Former(load_tiny_config()).save_pretrained(model_dir)
    assert main(["predict", str(broken), "--checkpoint", str(model_dir)]) == 1
    assert "broken.png" in capsys.readouterr().err


def load_tiny_config():
    from mask2former.config import load_config

    return load_config("fashion_scenes_lite0", TINY).model
