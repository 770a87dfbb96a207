import pytest
import torch

from mask2former.config import BackboneConfig
from mask2former.inference.predictor import Predictor
from mask2former.modeling.model import Mask2Former

from conftest import tiny_swin_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.mark.parametrize("backbone", ["swin_tiny", "tf_efficientnet_lite0"])
def test_export_matches_pytorch_on_two_sizes(tmp_path, backbone):
    from mask2former.interop.onnx import export_onnx

    config = tiny_swin_config() if backbone == "swin_tiny" else tiny_swin_config(backbone=BackboneConfig(name=backbone))
    model = Mask2Former(config).eval()
    report = export_onnx(model, tmp_path / "model.onnx", height=96, width=128)
    assert [check["input"] for check in report["checks"]] == [[1, 3, 96, 128], [2, 3, 64, 64]]
    for check in report["checks"]:
        assert check["max_abs_diff_logits"] < 1e-4 and check["max_abs_diff_masks"] < 1e-4


def test_predictor_runs_the_onnx_model_like_pytorch(tmp_path):
    from mask2former.data.label_space import LabelSpace
    from mask2former.interop.onnx import OnnxModel, export_onnx

    labels = LabelSpace(["a", "b", "c", "d", "e"], [True, True, True, False, False])
    model = Mask2Former(tiny_swin_config(), labels=labels.to_dict()).eval()
    export_onnx(model, tmp_path / "model.onnx", height=64, width=64)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    ours = Predictor(model, task="semantic")(image)
    onnx = Predictor(OnnxModel(tmp_path / "model.onnx"), task="semantic")(image)
    assert torch.equal(ours, onnx)
    with pytest.raises(ValueError, match="larger than the ONNX model's input size"):
        Predictor(OnnxModel(tmp_path / "model.onnx"), task="semantic")(torch.zeros(3, 100, 64, dtype=torch.uint8))
