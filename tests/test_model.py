import pytest
import torch

from mask2former.config import BackboneConfig
from mask2former.modeling.model import Mask2Former
import torch.nn.functional as F

from mask2former.modeling.transformer_decoder import MaskedTransformerDecoder, mask_logits_from_embeddings

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


def reference_attention_mask(mask_logits, size):
    """The reference's mask: resize the 1/4-resolution logits, block probability < 0.5, unblock all-blocked rows."""
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    blocked = resized.flatten(2).sigmoid() < 0.5
    return (blocked & ~blocked.all(-1, keepdim=True)).unsqueeze(1)


def test_attention_mask_from_resized_features_equals_resized_logits():
    """Resizing mask_features to the level (ours) blocks the same keys as resizing the full mask logits (the
    reference); a query whose mask is empty at the level attends everywhere."""
    torch.manual_seed(0)
    decoder = MaskedTransformerDecoder(in_channels=16, num_classes=3, hidden_dim=16, num_queries=5, num_heads=2,
                                       dim_feedforward=32, num_layers=2, mask_dim=16)
    queries = torch.randn(2, 5, 16)
    mask_features = torch.randn(2, 16, 32, 32)
    embeddings = decoder.heads.mask_embed(decoder.heads.decoder_norm(queries)).detach()
    for size in [(4, 4), (8, 8), (16, 16)]:
        level_features = F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
        ours = decoder._cross_mask(queries, level_features, None, layer=0)
        expected = reference_attention_mask(mask_logits_from_embeddings(embeddings, mask_features), size)
        assert ours.shape == (2, 1, 5, size[0] * size[1]) and not ours.requires_grad
        assert torch.equal(ours, expected)
    # Only channel k set, left half +1 and right half -1: a query with embedding[k] > 0 attends to the left half,
    # one with embedding[k] < 0 to the right half.
    positive = embeddings > 0
    channel = int(torch.nonzero(positive.flatten(0, 1).any(0) & (~positive).flatten(0, 1).any(0))[0])
    positive = positive[..., channel]
    level_features = torch.zeros(2, 16, 4, 4)
    level_features[:, channel, :, :2], level_features[:, channel, :, 2:] = 1.0, -1.0
    blocked = decoder._cross_mask(queries, level_features, None, layer=0)[:, 0].view(2, 5, 4, 4)
    assert torch.equal(blocked[..., :2].all(-1).all(-1), ~positive)
    assert torch.equal(blocked[..., 2:].all(-1).all(-1), positive)
    level_features[:, channel] = -1.0  # queries with embedding[k] > 0 now have empty masks: unblocked
    assert not decoder._cross_mask(queries, level_features, None, layer=0).any()


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


@pytest.mark.parametrize("backbone", ["swin_tiny", "resnet50"])
def test_forward_pads_to_size_divisibility_like_a_hand_padded_input(backbone):
    """detectron2 pads the normalised batch with zeros to multiples of 32 before the backbone; forward does the
    same, so a 113x120 input gives exactly the prediction of its hand-padded 128x128 version."""
    config = tiny_swin_config() if backbone == "swin_tiny" else tiny_swin_config(backbone=BackboneConfig(name=backbone))
    model = Mask2Former(config).eval()
    images = torch.randn(2, 3, 113, 120)
    padded = torch.zeros(2, 3, 128, 128)
    padded[:, :, :113, :120] = images
    with torch.no_grad():
        out = model(images, aux_outputs=False)
        ref = model(padded, aux_outputs=False)
    assert out.image_size == (113, 120) and out.padded_size == (128, 128)
    assert ref.image_size == (128, 128) and ref.padded_size == (128, 128)  # already divisible: used as is
    assert out.pred_masks.shape == ref.pred_masks.shape == (2, 10, 32, 32)
    torch.testing.assert_close(out.pred_logits, ref.pred_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pred_masks, ref.pred_masks, atol=1e-5, rtol=1e-5)

    from mask2former.inference.postprocess import batch_postprocess

    # Post-processing crops the valid region (113x120 of 128x128) the output reports.
    semantic = batch_postprocess(out, [out.image_size] * 2, None, "semantic", return_semantic_scores=True)
    expected = batch_postprocess(ref, [(113, 120)] * 2, None, "semantic", padded_size=(128, 128),
                                 return_semantic_scores=True)
    assert semantic[0].shape == (5, 113, 120)
    torch.testing.assert_close(semantic[0], expected[0], atol=1e-5, rtol=1e-5)


def test_forward_rejects_a_batch_that_is_not_bchw():
    model = Mask2Former(tiny_swin_config()).eval()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 64, 64))


def test_forward_pads_under_torch_compile():
    model = Mask2Former(tiny_swin_config()).eval()
    images = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        eager = model(images, aux_outputs=False)
        compiled = torch.compile(model, backend="eager", fullgraph=False)(images, aux_outputs=False)
    assert compiled.padded_size == (64, 96) and compiled.image_size == (50, 70)
    torch.testing.assert_close(compiled.pred_masks, eager.pred_masks, atol=1e-5, rtol=1e-5)
