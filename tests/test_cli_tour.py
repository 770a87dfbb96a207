"""The small defects a new user met around the pictures (issue 27, item 4): strict JSON in every file written,
one-line errors that write nothing, honest precision lines, --version, --help text."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from mask2former.cli import main
from mask2former.config import load_config
from mask2former.data import FashionScenes
from mask2former.modeling.model import Mask2Former

from test_train import TINY


def strict_load(text: str):
    """json.loads that refuses NaN / Infinity (as jq and strict parsers do)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    Mask2Former(load_config("fashion_scenes_lite0", TINY).model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(FashionScenes("val", num_images=1, image_size=64)[0]["image"].permute(1, 2, 0).numpy()).save(path)
    return path


def test_version_and_help_text(capsys):
    from mask2former import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mask2former {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "mask2former command line" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    for preset in ("fashion_scenes_lite0", "fashion_scenes_mpformer", "coco_panoptic_r50", "ade20k_semantic_r50"):
        assert preset in text


def test_predict_with_nothing_readable_says_so_in_one_line_and_writes_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "predictions"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for inputs in ([tmp_path / "missing.png"], [tmp_path / "missing.png", broken]):
        assert main(["predict", *map(str, inputs), "--checkpoint", str(model_dir), "--out", str(out)]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        error = captured.err.strip()
        assert "\n" not in error and error.startswith("mask2former predict: error: no input could be read")
        assert "missing.png" in error
        assert not out.exists()
    # an earlier run's folder is left as it was
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["predict", str(broken), "--checkpoint", str(model_dir), "--out", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_evaluate_a_missing_checkpoint_prints_only_its_error(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "does-not-exist"), "data.num_val_images=1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "\n" not in captured.err.strip() and "does-not-exist" in captured.err


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_every_json_file_predict_writes_is_strict(model_dir, image_file, tmp_path, task, capsys):
    out = tmp_path / task
    assert main(["predict", str(image_file), "--checkpoint", str(model_dir), "--task", task, "--out", str(out),
                 "--overlay-format", "jpg"]) == 0
    assert "precision fp32" in capsys.readouterr().out
    files = [path for path in out.rglob("*.json")]
    assert len(files) >= 3  # summary, results, records
    for path in files:
        strict_load(path.read_text())
    assert Image.open(out / f"scene_{task}.jpg").format == "JPEG" and not (out / f"scene_{task}.png").exists()
    # a rerun with the other format makes the PNG (the JPEG does not count as done)
    assert main(["predict", str(image_file), "--checkpoint", str(model_dir), "--task", task, "--out", str(out)]) == 0
    assert (out / f"scene_{task}.png").exists()


def test_evaluate_out_and_metrics_jsonl_write_undefined_metrics_as_null(model_dir, tmp_path, capsys):
    from mask2former.training.metrics_log import MetricsLog

    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(model_dir), "data.num_val_images=2", "data.image_size=64",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("precision: fp32")
    written = strict_load(out.read_text())
    # no object is larger than 96^2 pixels in a 64^2 image: APl is undefined
    assert written["metrics"]["APl"] is None
    # metrics.jsonl: the same rule for the same value
    log = MetricsLog(tmp_path / "run", enabled=True, tensorboard=False, progress_bar=False)
    (tmp_path / "run").mkdir()
    log.open(load_config("fashion_scenes_lite0", TINY), 0, resumed=False)
    log.write_row({"step": 1, "APl": math.nan, "loss": math.inf, "PQ": 1.5})
    log.close()
    row = strict_load((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row == {"step": 1, "APl": None, "loss": None, "PQ": 1.5}


def test_int8_onnx_predict_says_int8_and_export_explains_the_warning(model_dir, image_file, tmp_path, capsys,
                                                                     caplog):
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(model_dir), "--out", str(onnx_path), "--height", "64", "--width", "64",
                 "--quantize", "int8"]) == 0
    captured = capsys.readouterr()
    report = strict_load(captured.out)
    assert "quant_pre_process" in report["int8"]["note"]
    assert not any("pre-processing" in record.getMessage() for record in caplog.records)
    assert "pre-processing" not in captured.err
    int8 = tmp_path / "model.int8.onnx"
    assert main(["predict", str(image_file), "--onnx", str(int8), "--task", "semantic", "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "precision int8" in printed and "fp32" not in printed
    assert strict_load((tmp_path / "p" / "summary.json").read_text())["precision"] == "int8"
    assert main(["predict", str(image_file), "--onnx", str(int8), "--precision", "bf16", "--out", str(tmp_path / "q")]) == 1
    assert "int8" in capsys.readouterr().err and not (tmp_path / "q").exists()
    assert np.asarray(Image.open(tmp_path / "p" / "scene_semantic.png")).shape[-1] == 3
