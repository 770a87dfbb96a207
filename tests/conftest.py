import pytest
import torch

from mask2former.config import BackboneConfig, ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
