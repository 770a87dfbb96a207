import pytest
import torch

from mask2former.config import BackboneConfig
from mask2former.modeling.model import Mask2Former
from mask2former.modeling.transformer_decoder import attention_mask_from_masks

from conftest import tiny_swin_config


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_mask2former_shapes(size, device):
    model = Mask2Former(tiny_swin_config()).eval().to(device)
    out = model(torch.randn(2, 3, *size, device=device))
    assert out.pred_logits.shape == (2, 10, 6)
    assert out.pred_masks.shape == (2, 10, size[0] // 4, size[1] // 4)
    # 3 layers + the prediction from the initial queries; the last one is the output.
    assert len(out.aux_outputs) == 3
    for aux in out.aux_outputs:
        assert aux["pred_logits"].shape == out.pred_logits.shape
        assert aux["pred_masks"].shape == out.pred_masks.shape


def test_maskformer_variant_shapes(device):
    config = tiny_swin_config(pixel_decoder="fpn", transformer_decoder="standard", dec_layers=6)
    model = Mask2Former(config).eval().to(device)
    out = model(torch.randn(1, 3, 64, 96, device=device))
    assert out.pred_logits.shape == (1, 10, 6)
    assert out.pred_masks.shape == (1, 10, 16, 24)
    assert len(out.aux_outputs) == 5  # six layers, no prediction from the (zero) initial queries


def test_masked_decoder_refuses_fpn():
    with pytest.raises(ValueError, match="masked decoder"):
        Mask2Former(tiny_swin_config(pixel_decoder="fpn"))


def test_every_parameter_gets_a_gradient(device):
    model = Mask2Former(tiny_swin_config()).train().to(device)
    # The deformable offset/attention projections start at zero, which blocks gradients to the query path
    # (and so to the level embedding) until the first update; perturb them as one step of training would.
    for layer in model.pixel_decoder.encoder:
        torch.nn.init.normal_(layer.self_attn.sampling_offsets.weight, std=0.01)
        torch.nn.init.normal_(layer.self_attn.attention_weights.weight, std=0.01)
    out = model(torch.randn(2, 3, 64, 64, device=device))
    loss = out.pred_logits.square().mean() + out.pred_masks.square().mean()
    loss = loss + sum(a["pred_logits"].mean() + a["pred_masks"].mean() for a in out.aux_outputs)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_deterministic_and_batch_independent(device):
    model = Mask2Former(tiny_swin_config()).eval().to(device)
    images = torch.randn(2, 3, 64, 96, device=device)
    with torch.no_grad():
        a = model(images)
        b = model(images)
        single = model(images[1:])
    assert torch.equal(a.pred_masks, b.pred_masks)
    torch.testing.assert_close(a.pred_masks[1:], single.pred_masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.pred_logits[1:], single.pred_logits, atol=1e-4, rtol=1e-4)


def test_timm_backbones_build_and_run(device):
    for name in ("resnet50", "tf_efficientnet_lite0"):
        config = tiny_swin_config(backbone=BackboneConfig(name=name))
        model = Mask2Former(config).eval().to(device)
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64, device=device))
        assert out.pred_masks.shape == (1, 10, 16, 16)
        assert torch.isfinite(out.pred_masks).all()


def test_attention_mask_blocks_low_probability_and_fixes_empty_rows():
    logits = torch.full((1, 3, 8, 8), -5.0)
    logits[0, 0, :4, :4] = 5.0  # query 0: top-left quarter
    logits[0, 1] = 5.0  # query 1: everything
    # query 2: empty mask -> would block every key; it must attend everywhere instead
    blocked = attention_mask_from_masks(logits, (4, 4))
    assert blocked.shape == (1, 1, 3, 16)
    expected0 = torch.ones(4, 4, dtype=torch.bool)
    expected0[:2, :2] = False
    assert torch.equal(blocked[0, 0, 0], expected0.flatten())
    assert not blocked[0, 0, 1].any()
    assert not blocked[0, 0, 2].any()


def test_attention_mask_is_detached():
    logits = torch.randn(1, 2, 8, 8, requires_grad=True)
    assert not attention_mask_from_masks(logits, (4, 4)).requires_grad


def test_normalize_zeroes_padding():
    model = Mask2Former(tiny_swin_config())
    images = torch.full((1, 3, 4, 4), 200, dtype=torch.uint8)
    padding = torch.zeros(1, 4, 4, dtype=torch.bool)
    padding[:, :, 2:] = True
    out = model.normalize(images, padding)
    assert torch.all(out[..., 2:] == 0)
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor((200 - 123.675) / 58.395))


@pytest.mark.parametrize("decoder", ["masked", "standard"])
def test_inference_path_without_aux_outputs_gives_the_same_final_prediction(decoder):
    overrides = {} if decoder == "masked" else dict(transformer_decoder="standard", dec_layers=4)
    model = Mask2Former(tiny_swin_config(**overrides)).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        full = model(images)
        fast = model(images, aux_outputs=False)
    assert fast.aux_outputs == []
    torch.testing.assert_close(fast.pred_logits, full.pred_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.pred_masks, full.pred_masks, atol=1e-4, rtol=1e-4)
