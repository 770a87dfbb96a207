"""MSDeformAttnPixelDecoder: the reference's fp32 region and its initialisation (invariants of msdeformattn.py's
``MSDeformAttnTransformerEncoderOnly._reset_parameters`` and ms_deform_attn.py's ``MSDeformAttn._reset_parameters``)."""

import math

import pytest
import torch
from torch import nn

from mask2former.config import BackboneConfig, ModelConfig
from mask2former.modeling.model import Mask2Former
from mask2former.modeling.pixel_decoder import MSDeformAttnPixelDecoder

IN_CHANNELS = [16, 24, 40, 48]


def _features(device, dtype=torch.float32, batch=2, size=32):
    generator = torch.Generator().manual_seed(1)
    shapes = [(c, size // s, size // s) for c, s in zip(IN_CHANNELS, (4, 8, 16, 32))]
    return [torch.randn(batch, *shape, generator=generator).to(device=device, dtype=dtype) for shape in shapes]


def _run_recording_dtypes(decoder, features, device_type):
    """Output dtypes of every conv / linear / norm inside the decoder, and the decoder's outputs, under bf16 autocast."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in decoder.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm))]
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        mask_features, multi_scale = decoder(features)
    for hook in hooks:
        hook.remove()
    return seen, mask_features, multi_scale


def test_fp32_pixel_decoder_runs_without_autocast(device):
    """``fp32=True`` (reference): bf16 inputs under bf16 autocast give fp32 computation and outputs, bit-equal to
    running the fp32 module on the same values with autocast off; ``fp32=False`` lets autocast lower it."""
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(IN_CHANNELS, conv_dim=32, mask_dim=32, num_encoder_layers=2, num_heads=4,
                                       ffn_dim=64).to(device).eval()
    features = _features(device, torch.bfloat16)
    with torch.no_grad():
        seen, mask_features, multi_scale = _run_recording_dtypes(decoder, features, device.type)
        assert len(seen) > 10 and set(seen) == {torch.float32}
        assert mask_features.dtype == torch.float32 and {m.dtype for m in multi_scale} == {torch.float32}
        expected_mask, expected_scales = decoder([f.float() for f in features])
    assert torch.equal(mask_features, expected_mask)
    for got, want in zip(multi_scale, expected_scales):
        assert torch.equal(got, want)

    decoder.fp32 = False
    with torch.no_grad():
        seen, mask_features, _ = _run_recording_dtypes(decoder, features, device.type)
    assert torch.bfloat16 in seen and mask_features.dtype == torch.bfloat16


def test_model_config_switch():
    config = ModelConfig(num_classes=3, backbone=BackboneConfig(name="resnet18"), hidden_dim=32, conv_dim=32,
                         mask_dim=32, num_heads=2, num_queries=4, dim_feedforward=32, enc_layers=1, enc_ffn_dim=32,
                         dec_layers=1, pixel_decoder_fp32=False)
    assert Mask2Former(config).pixel_decoder.fp32 is False
    assert ModelConfig().pixel_decoder_fp32 is True  # the reference's setting is the default


def _xavier_bound(weight):
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return MSDeformAttnPixelDecoder(IN_CHANNELS, conv_dim=64, mask_dim=64, num_encoder_layers=3, num_heads=8,
                                    num_points=4, ffn_dim=512)


def test_encoder_ffn_is_xavier_uniform(decoder):
    for layer in decoder.encoder:
        for linear in (layer.linear1, layer.linear2):
            bound = _xavier_bound(linear.weight)  # sqrt(6 / (64 + 512)) = 0.102 for both
            weight = linear.weight.detach()
            # Uniform(-b, b): max |w| just below b, std b / sqrt(3). PyTorch's default (kaiming a=sqrt(5)) would have
            # bound 1/sqrt(fan_in): 0.125 for linear1, 0.044 for linear2.
            assert weight.abs().max() <= bound and weight.abs().max() > 0.99 * bound
            assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    # Each layer drew its own weights; the biases are those of one cloned layer (the reference deep-copies it).
    first, second = decoder.encoder[0], decoder.encoder[1]
    assert not torch.equal(first.linear1.weight, second.linear1.weight)
    for name in ("linear1", "linear2"):
        biases = [getattr(layer, name).bias for layer in decoder.encoder]
        assert all(torch.equal(biases[0], b) for b in biases[1:])
        fan_in = getattr(first, name).weight.shape[1]
        assert biases[0].abs().max() <= 1 / math.sqrt(fan_in) and biases[0].abs().max() > 0


def test_msdeformattn_init_is_the_reference_grid(decoder):
    # 8 heads point (cos, sin) of k*45 degrees scaled so the larger coordinate is 1; point p sits at (p + 1) times
    # that, on every level.
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    expected = directions[:, None, None, :] * torch.arange(1, 5, dtype=torch.float32)[None, None, :, None]
    expected = expected.expand(8, 3, 4, 2).reshape(-1)
    for layer in decoder.encoder:
        attn = layer.self_attn
        assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
        torch.testing.assert_close(attn.sampling_offsets.bias.detach(), expected, rtol=0, atol=1e-5)  # float32 cos/sin
        for zero in (attn.attention_weights.weight, attn.attention_weights.bias, attn.value_proj.bias,
                     attn.output_proj.bias):
            assert torch.count_nonzero(zero) == 0
        for linear in (attn.value_proj, attn.output_proj):
            bound = _xavier_bound(linear.weight)
            assert 0.95 * bound < linear.weight.abs().max() <= bound
        # LayerNorms untouched by xavier (dim 1): ones and zeros.
        assert torch.equal(layer.norm1.weight, torch.ones(64)) and torch.count_nonzero(layer.norm2.bias) == 0


def test_input_proj_and_level_embed_init(decoder):
    for proj, channels in zip(decoder.input_proj, reversed(IN_CHANNELS[1:])):
        weight = proj[0].weight.detach()
        bound = math.sqrt(6.0 / (channels + 64))  # xavier_uniform_, gain 1, of a 1x1 conv
        assert weight.abs().max() <= bound and torch.count_nonzero(proj[0].bias) == 0
    # normal_ last: 192 standard-normal draws exceed 1 somewhere (xavier's bound here would be 0.30).
    assert decoder.level_embed.abs().max() > 1.0
