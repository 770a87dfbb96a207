import socket

import pytest
import torch

from mask2former.config import load_config
from mask2former.inference.predictor import Predictor
from mask2former.modeling.model import Mask2Former


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_default_model_builds_and_predicts_without_network(no_network):
    # The default preset loads its ImageNet backbone weights from an installed package, never from a hub.
    config = load_config("fashion_scenes_lite0", ["model.num_queries=10", "model.dec_layers=2", "model.enc_layers=1"])
    model = Mask2Former(config.model).eval()
    result = Predictor(model, task="semantic")(torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8))
    assert result.shape == (64, 80)


@pytest.mark.parametrize("preset", ["coco_panoptic_r50", "coco_panoptic_swin_tiny"])
def test_reference_presets_build_without_network(no_network, preset):
    model = Mask2Former(load_config(preset, ["model.enc_layers=1", "model.dec_layers=1"]).model).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64), aux_outputs=False)
    assert out.pred_masks.shape == (1, 100, 16, 16)
