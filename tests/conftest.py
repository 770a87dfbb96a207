import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mask2former.config import BackboneConfig, ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where device-aware tests run: ``MASK2FORMER_TEST_DEVICE`` (default ``cpu``; e.g. ``cuda``, ``cuda:1``).

    On CUDA, TF32 is switched off so that the CPU tolerances (and peer-library comparisons) still hold."""
    name = os.environ.get("MASK2FORMER_TEST_DEVICE", "cpu")
    try:
        selected = torch.device(name)
    except RuntimeError:
        pytest.fail(f"MASK2FORMER_TEST_DEVICE={name!r} is not a torch device", pytrace=False)
    if selected.type == "cuda":
        if not torch.cuda.is_available():
            pytest.fail(f"MASK2FORMER_TEST_DEVICE={name!r} but CUDA is not available", pytrace=False)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return selected


def tiny_swin_config(**overrides) -> ModelConfig:
    """HF-test-style tiny model: hidden 64, 10 queries, a two-block-per-stage Swin."""
    values = dict(
        num_classes=5,
        backbone=BackboneConfig(
            name="swin_tiny", drop_path_rate=0.0,
            kwargs=dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4),
        ),
        hidden_dim=64, conv_dim=64, mask_dim=64, num_heads=4, num_queries=10, dim_feedforward=128,
        enc_ffn_dim=128, enc_layers=2, dec_layers=3,
    )
    values.update(overrides)
    return ModelConfig(**values)


# The suite runs many tiny models: one intra-op thread avoids oversubscribing 2-core machines (and is faster there).
torch.set_num_threads(1)


def load_experiment(name: str, module_name: str):
    """``experiments/<name>.py`` imported as a module (the experiment scripts are not part of the package)."""
    script = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
