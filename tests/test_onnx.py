import json

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.config import BackboneConfig
from mask2former.inference.predictor import Predictor
from mask2former.modeling.model import Mask2Former

from conftest import tiny_swin_config
from random_inputs import trained_like

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# Square, non-square, and two sizes that are not multiples of size_divisibility (32): the graph pads them itself.
SIZES = [(1, 64, 64), (2, 64, 128), (1, 75, 53), (1, 96, 40)]


@pytest.mark.parametrize("backbone", ["swin_tiny", "tf_efficientnet_lite0"])
def test_one_file_matches_pytorch_at_every_size(tmp_path, backbone):
    from mask2former.apps.onnx import OnnxModel, export_onnx

    config = tiny_swin_config() if backbone == "swin_tiny" else tiny_swin_config(backbone=BackboneConfig(name=backbone))
    model = Mask2Former(config).eval()
    report = export_onnx(model, tmp_path / "model.onnx", height=96, width=128, check_sizes=SIZES)
    assert [check["input"] for check in report["checks"]] == [[b, 3, h, w] for b, h, w in SIZES]
    assert [check["padded"] for check in report["checks"]][2:] == [[96, 64], [96, 64]]
    for check in report["checks"]:
        assert check["max_abs_diff_logits"] < 1e-4 and check["max_abs_diff_masks"] < 1e-4, check
    # The file itself declares symbolic batch, height and width (not the traced 96x128).
    graph_input = onnx.load(str(tmp_path / "model.onnx")).graph.input[0]
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    # A size the export report did not check, compared here independently of export_onnx.
    images = torch.randn(1, 3, 160, 33)
    got = OnnxModel(tmp_path / "model.onnx")(images)
    with torch.no_grad():
        expected = model(images, aux_outputs=False)
    assert got.padded_size == expected.padded_size == (160, 64)
    torch.testing.assert_close(got.pred_masks, expected.pred_masks, atol=1e-4, rtol=0)


def test_predictor_runs_the_onnx_model_like_pytorch_without_an_export_size(tmp_path):
    from mask2former.data.label_space import LabelSpace
    from mask2former.apps.onnx import OnnxModel, export_onnx

    labels = LabelSpace(["a", "b", "c", "d", "e"], [True, True, True, False, False])
    model = Mask2Former(tiny_swin_config(), labels=labels.to_dict()).eval()
    export_onnx(model, tmp_path / "model.onnx", height=64, width=64, check_sizes=[(1, 64, 64)])
    runner = OnnxModel(tmp_path / "model.onnx")
    # Larger than the traced size, non-square and not a multiple of 32: nothing is padded up to an export size.
    images = [torch.randint(0, 256, (3, 100, 70), dtype=torch.uint8), torch.randint(0, 256, (3, 50, 64), dtype=torch.uint8)]
    for task in ("semantic", "panoptic"):
        ours = Predictor(model, task=task)(images)
        theirs = Predictor(runner, task=task)(images)
        for a, b in zip(ours, theirs):
            if task == "semantic":
                assert torch.equal(a, b)
            else:
                assert torch.equal(a[0], b[0]) and [s["category_id"] for s in a[1]] == [s["category_id"] for s in b[1]]


def test_int8_export_runs_and_agrees_with_fp32(tmp_path):
    from mask2former.apps.onnx import OnnxModel, export_onnx

    model = trained_like(Mask2Former(tiny_swin_config()))
    report = export_onnx(model, tmp_path / "model.onnx", height=64, width=64, quantize="int8", check_sizes=SIZES[:3])
    int8_path = tmp_path / "model.int8.onnx"
    assert report["int8"]["onnx"] == str(int8_path) and (tmp_path / "model.int8.yaml").exists()
    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops, ops
    # Unrelated masks would agree about half the time. Measured on tiny models like this one (4 seeds): 0.70-0.99 of
    # all mask signs agree (many logits sit near zero), 0.991-0.999 where |fp32 logit| > 0.25 std, correlation >= 0.975.
    for check in report["int8"]["checks"]:
        assert check["mask_sign_agreement"] > 0.9, check
    runner = OnnxModel(int8_path)
    assert runner.precision == "int8"
    images = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        expected = model(images, aux_outputs=False).pred_masks
    got = runner(images).pred_masks
    assert got.shape == expected.shape
    confident = expected.abs() > 0.25 * expected.std()
    assert ((got > 0) == (expected > 0))[confident].float().mean() > 0.98
    assert np.corrcoef(got.flatten().numpy(), expected.flatten().numpy())[0, 1] > 0.95


def test_cli_exports_int8_and_predicts_with_it(tmp_path, capsys):
    from mask2former.cli import main
    from mask2former.data import FashionScenes

    dataset = FashionScenes("val", num_images=1, image_size=80)
    model = trained_like(Mask2Former(tiny_swin_config(num_classes=dataset.label_space.num_classes),
                                      labels=dataset.label_space.to_dict()))
    model.save_pretrained(tmp_path / "ckpt")
    image_file = tmp_path / "scene.png"
    Image.fromarray(dataset[0]["image"].permute(1, 2, 0).numpy()).save(image_file)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--height", "64", "--width", "64",
                 "--quantize", "int8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["checks"]) >= 3 and report["max_abs_diff_masks"] < 1e-4
    shapes = {tuple(check["input"][2:]) for check in report["checks"]}
    assert any(h == w for h, w in shapes) and any(h != w for h, w in shapes) and any(h % 32 or w % 32 for h, w in shapes)
    assert all(check["mask_sign_agreement"] > 0.9 for check in report["int8"]["checks"])
    for name, path in (("fp32", out), ("int8", tmp_path / "model.int8.onnx")):
        assert main(["predict", str(image_file), "--onnx", str(path), "--task", "semantic", "--out", str(tmp_path / name)]) == 0
    assert main(["predict", str(image_file), "--checkpoint", str(tmp_path / "ckpt"), "--task", "semantic",
                 "--out", str(tmp_path / "torch")]) == 0
    torch_ids = np.asarray(Image.open(tmp_path / "torch" / "semantic" / "scene.png"))
    fp32_ids = np.asarray(Image.open(tmp_path / "fp32" / "semantic" / "scene.png"))
    int8_ids = np.asarray(Image.open(tmp_path / "int8" / "semantic" / "scene.png"))
    assert torch_ids.shape == (80, 80)  # 80x80 ran as is (padded to 96 inside the graph), not padded to 64 or refused
    assert (fp32_ids == torch_ids).mean() > 0.999
    assert (int8_ids == torch_ids).mean() > 0.9


def test_quantize_rejects_unknown_modes(tmp_path):
    from mask2former.apps.onnx import export_onnx

    with pytest.raises(ValueError, match="quantize must be one of int8"):
        export_onnx(Mask2Former(tiny_swin_config()), tmp_path / "m.onnx", height=64, width=64, quantize="int4")
