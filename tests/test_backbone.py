"""Backbones: strides, channels, FrozenBN, any-size Swin checked against transformers' SwinBackbone."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import FrozenBatchNormAct2d
from torchvision.ops.misc import FrozenBatchNorm2d

from mask2former.config import BackboneConfig
from mask2former.modeling.backbone import Backbone
from mask2former.modeling.swin import SwinTransformer

CHANNELS = {
    "resnet50": [256, 512, 1024, 2048],
    "tf_efficientnet_lite0": [24, 40, 112, 320],
    "swin_tiny": [96, 192, 384, 768],
    "swin_small": [96, 192, 384, 768],
    "swin_base": [128, 256, 512, 1024],
    "swin_large": [192, 384, 768, 1536],
}
# timm classifiers with the same trunks; ours lacks the classifier head and adds LayerNorms on stages 1-3.
TIMM_SWIN = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window12_384",
    "swin_large": "swin_large_patch4_window12_384",
}
# Published totals including the 1000-class head (millions): Swin-T 28.3, Swin-S 49.6, Swin-B 87.9, Swin-L 196.7.
PUBLISHED_MILLIONS = {"swin_tiny": 28.3, "swin_small": 49.6, "swin_base": 87.9, "swin_large": 196.7}


@pytest.mark.parametrize("name", ["resnet50", "tf_efficientnet_lite0", "swin_tiny"])
def test_strides_and_channels(name):
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(name=name)).eval()
    assert backbone.out_channels == CHANNELS[name]
    height, width = 64, 96
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, height, width))
    assert [tuple(f.shape) for f in features] == [
        (1, channels, height // stride, width // stride) for channels, stride in zip(CHANNELS[name], (4, 8, 16, 32))
    ]
    assert all(torch.isfinite(f).all() for f in features)


@pytest.mark.parametrize("name", list(TIMM_SWIN))
def test_swin_parameter_counts(name, monkeypatch):
    # Random init of up to 195M parameters dominates the cost and does not change the count: skip it.
    monkeypatch.setattr(torch.nn.init, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
    backbone = Backbone(BackboneConfig(name=name))
    assert backbone.out_channels == CHANNELS[name]
    with torch.device("meta"):
        peer = timm.create_model(TIMM_SWIN[name])
    peer_total = sum(p.numel() for p in peer.parameters())
    head = sum(p.numel() for p in peer.head.parameters())
    stage_norms = 2 * sum(CHANNELS[name][:3])
    ours = sum(p.numel() for p in backbone.parameters())
    assert ours == peer_total - head + stage_norms
    assert round((ours - stage_norms + head) / 1e6, 1) == PUBLISHED_MILLIONS[name]


def test_unknown_backbones_are_rejected():
    with pytest.raises(ValueError, match="unknown Swin variant"):
        Backbone(BackboneConfig(name="swin_huge"))
    with pytest.raises(ValueError, match="strides 4/8/16/32"):
        Backbone(BackboneConfig(name="vit_tiny_patch16_224", kwargs={"img_size": 64}))


def _bn_buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_resnet_frozen_bn():
    torch.manual_seed(0)
    frozen = Backbone(BackboneConfig(name="resnet50", freeze_bn=True))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    # Give the frozen statistics non-trivial values so that folding them is actually exercised.
    with torch.no_grad():
        for module in frozen.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    before = _bn_buffers(frozen)
    frozen.train()
    images = torch.randn(2, 3, 32, 32)
    sum(f.mean() for f in frozen(images)).backward()
    after = _bn_buffers(frozen)
    assert before.keys() == after.keys() and len(before) > 100
    assert all(torch.equal(before[k], after[k]) for k in before)
    convs = [m for m in frozen.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)

    # Oracle: the same weights with ordinary BatchNorm in eval mode give the same features.
    plain = Backbone(BackboneConfig(name="resnet50", freeze_bn=False))
    plain.load_state_dict(frozen.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        for got, want in zip(frozen(images), plain(images)):
            # Features reach ~1e3 with random weights; folding BN only changes rounding (measured ~1e-6 relative).
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    # Negative control: unfrozen BatchNorm in train mode does update its statistics.
    plain.train()
    plain_before = _bn_buffers(plain)
    with torch.no_grad():
        plain(images)
    assert not all(torch.equal(plain_before[k], v) for k, v in _bn_buffers(plain).items())


def test_efficientnet_frozen_bn_has_no_trainable_norm():
    backbone = Backbone(BackboneConfig(name="tf_efficientnet_lite0"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNormAct2d) for m in backbone.modules())


@pytest.mark.parametrize("name, freeze_at, frozen_prefixes, trained_prefix", [
    ("resnet50", 1, ["conv1."], "layer1."),
    ("resnet50", 2, ["conv1.", "layer1."], "layer2."),
    ("tf_efficientnet_lite0", 1, ["conv_stem.", "blocks.0."], "blocks.1."),
    ("tf_efficientnet_lite0", 3, ["conv_stem.", "blocks.0.", "blocks.1.", "blocks.2."], "blocks.3."),
    ("swin_tiny", 2, ["patch_embed.", "layers.0."], "layers.1."),
])
def test_freeze_at(name, freeze_at, frozen_prefixes, trained_prefix):
    kwargs = dict(TINY_SWIN) if name == "swin_tiny" else {}
    backbone = Backbone(BackboneConfig(name=name, freeze_at=freeze_at, freeze_bn=name != "tf_efficientnet_lite0",
                                       kwargs=kwargs))
    sum(f.float().mean() for f in backbone(torch.randn(1, 3, 64, 64))).backward()
    params = dict(backbone.body.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    # detectron2's FREEZE_AT semantics: exactly the stem (+ res2..res_k) stops, and it gets no gradient.
    assert frozen == {n for n in params if any(n.startswith(prefix) for prefix in frozen_prefixes)}
    assert frozen and all(params[n].grad is None for n in frozen)
    trained = [p for n, p in params.items() if n.startswith(trained_prefix)]
    assert trained and all(p.grad is not None for p in trained)
    # Batch norms inside the frozen part keep their statistics even where the rest trains its BN.
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and n.startswith(tuple(frozen_prefixes))
                   for n, m in backbone.body.named_modules())
    with pytest.raises(ValueError, match="freeze_at"):
        Backbone(BackboneConfig(name=name, freeze_at=6, kwargs=kwargs))


TINY_SWIN = dict(embed_dim=12, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=7)


@pytest.mark.parametrize("size", [(100, 76), (101, 75), (37, 45)])
def test_swin_any_input_size(size):
    model = SwinTransformer(**TINY_SWIN, drop_path_rate=0.0).eval()
    height, width = size
    with torch.no_grad():
        features = model(torch.randn(1, 3, height, width))
    assert [tuple(f.shape[-2:]) for f in features] == [
        (math.ceil(height / s), math.ceil(width / s)) for s in (4, 8, 16, 32)
    ]


# transformers 4.x names -> 5.x names, so the mapping below serves both.
_HF4_NAMES = {
    "attention.self.query": "attention.q_proj", "attention.self.key": "attention.k_proj",
    "attention.self.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
    "attention.self.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
}


def _hf_to_ours(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers SwinBackbone names -> ours (q/k/v projections concatenated into qkv)."""
    for old, new in _HF4_NAMES.items():
        hf_state = {key.replace(old, new): value for key, value in hf_state.items()}
    ours = {}
    for key, value in hf_state.items():
        if key.startswith("swin.layernorm.") or key.endswith("relative_position_index"):
            continue  # final classifier norm (unused by the backbone) and a derived buffer
        if key.startswith("hidden_states_norms.stage"):
            stage = int(key.split(".")[1].removeprefix("stage")) - 1
            ours[f"norms.{stage}.{key.split('.')[-1]}"] = value
            continue
        new = (key.removeprefix("swin.").replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
               .replace("embeddings.norm", "patch_embed.norm").replace("encoder.layers", "layers")
               .replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
               .replace("attention.relative_position_bias.", "attn.").replace("attention.o_proj", "attn.proj"))
        if "attention.q_proj" in new:
            parts = [hf_state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            ours[new.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts)
        elif "attention.k_proj" in new or "attention.v_proj" in new:
            continue
        else:
            ours[new] = value
    return ours


@pytest.fixture(scope="module")
def swin_pairs():
    """window size -> (transformers SwinBackbone, our SwinTransformer with the same random weights), float64."""
    transformers = pytest.importorskip("transformers")
    pairs = {}

    def make(window: int):
        if window not in pairs:
            config = transformers.SwinConfig(
                image_size=224, embed_dim=TINY_SWIN["embed_dim"], depths=list(TINY_SWIN["depths"]),
                num_heads=list(TINY_SWIN["num_heads"]), window_size=window, drop_path_rate=0.0,
                out_features=["stage1", "stage2", "stage3", "stage4"],
            )
            torch.manual_seed(0)
            peer = transformers.SwinBackbone(config).eval().double()
            with torch.no_grad():
                for param in peer.parameters():  # random everything: biases, norms and the position table all matter
                    param.normal_(0.0, 0.2)
            ours = SwinTransformer(**{**TINY_SWIN, "window_size": window}, drop_path_rate=0.0).double().eval()
            ours.load_state_dict(_hf_to_ours(peer.state_dict()), strict=True)
            pairs[window] = peer, ours
        return pairs[window]

    return make


# Sizes whose stage maps are mostly not window multiples, so padding, shift masks and odd merges all run. Window 7:
# at 256x256 and 320x256 the last stage (8x8, 10x8) is larger than the window; at 100x76 it is smaller (padded and
# still shifted, as the reference does). Window 12 (Swin-B/L): 416x392 gives a 13x13-ish last stage.
@pytest.mark.parametrize("window, size", [(7, (256, 256)), (7, (320, 256)), (7, (100, 76)), (12, (416, 392))])
def test_swin_matches_transformers(swin_pairs, window, size):
    peer, ours = swin_pairs(window)
    torch.manual_seed(1)
    images = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        expected = peer(images).feature_maps
        got = ours(images)
    assert len(got) == len(expected) == 4
    for ours_map, peer_map in zip(got, expected):
        torch.testing.assert_close(ours_map, peer_map, atol=1e-5, rtol=1e-5)


def test_swin_drop_path_rates():
    rate = 0.3
    backbone = Backbone(BackboneConfig(name="swin_tiny", drop_path_rate=rate, kwargs={"embed_dim": 24}))
    blocks = [block for stage in backbone.body.layers for block in stage.blocks]
    assert len(blocks) == 12  # Swin-T depths 2, 2, 6, 2
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in blocks]
    expected = [rate * i / 11 for i in range(12)]  # linear from 0 to the rate over all blocks, as the reference
    assert rates == pytest.approx(expected)
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)


@pytest.mark.parametrize("name, channels_last", [("tf_efficientnet_lite0", True), ("resnet50", False)])
def test_frozen_norms_folded_into_convolutions_give_the_same_features_and_state(name, channels_last, monkeypatch):
    from mask2former.modeling import backbone as backbone_module
    from mask2former.modeling.frozen_norm_fold import NormFoldedConv2d

    torch.manual_seed(0)
    folded = Backbone(BackboneConfig(name=name, freeze_at=0))
    assert folded.channels_last == channels_last  # NHWC only where depthwise convolutions gain from it
    monkeypatch.setattr(backbone_module, "fold_frozen_norms", lambda body: 0)
    plain = Backbone(BackboneConfig(name=name, freeze_at=0))
    assert not any(isinstance(m, NormFoldedConv2d) for m in plain.modules())
    assert sum(isinstance(m, NormFoldedConv2d) for m in folded.modules()) > 10
    with torch.no_grad():  # non-trivial statistics, the same in both
        for module in folded.modules():
            if isinstance(module, (FrozenBatchNorm2d, FrozenBatchNormAct2d)):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    assert list(folded.state_dict()) == list(plain.state_dict())  # checkpoints are unchanged by folding
    plain.load_state_dict(folded.state_dict())
    images = torch.randn(2, 3, 64, 64)
    features = folded(images)
    for got, want in zip(features, plain(images)):
        assert got.is_contiguous()  # NCHW for the pixel decoder
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    sum(f.square().mean() for f in features).backward()
    sum(f.square().mean() for f in plain(images)).backward()
    folded_grads = {n: p.grad for n, p in folded.named_parameters() if p.grad is not None}
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert folded_grads.keys() == plain_grads.keys() and len(folded_grads) > 10
    for key, grad in folded_grads.items():
        # Random 50-layer nets amplify rounding where a ReLU input is near 0: ResNet-50's stem gradient differs by
        # up to 4e-4 of its largest element; EfficientNet's by far less.
        torch.testing.assert_close(grad, plain_grads[key], rtol=1e-2, atol=1e-3 * plain_grads[key].abs().max().item())
