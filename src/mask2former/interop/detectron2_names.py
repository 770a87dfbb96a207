"""detectron2 Mask2Former / MaskFormer key names <-> ours: one table of renaming rules per part of the model,
serving both directions, and the Swin buffer the reference stores but we recompute."""

from __future__ import annotations

import re

import numpy as np

from ..config import SWIN_SPECS, BackboneConfig, ModelConfig
from .errors import CheckpointError

PIXEL = "sem_seg_head.pixel_decoder."
PREDICTOR = "sem_seg_head.predictor."
RESNET_DEPTHS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}
# Buffers of the reference model that ours does not store: the criterion's class weights (a loss setting) and
# Swin's relative position index (a function of the window size, recomputed by our Swin).
EMPTY_WEIGHT = "criterion.empty_weight"
POSITION_INDEX = re.compile(r"backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index")


# ----- renaming rules -------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(n|rest)\}")


class _Rule:
    """A pair of key templates, ours and official; ``{n}`` is an integer, ``{rest}`` the remaining suffix.
    Placeholders appear in the same order in both templates."""

    def __init__(self, ours: str, official: str) -> None:
        self.templates = (ours, official)
        self.patterns = tuple(self._compile(t) for t in self.templates)

    @staticmethod
    def _compile(template: str) -> re.Pattern:
        parts = _PLACEHOLDER.split(template)  # literal, kind, literal, kind, ..., literal
        regex = "".join(
            re.escape(part) if i % 2 == 0 else (r"(\d+)" if part == "n" else r"(.+)") for i, part in enumerate(parts)
        )
        return re.compile(regex)

    def apply(self, key: str, to_official: bool) -> str | None:
        source, target = (0, 1) if to_official else (1, 0)
        match = self.patterns[source].fullmatch(key)
        if match is None:
            return None
        values = iter(match.groups())
        return _PLACEHOLDER.sub(lambda _: next(values), self.templates[target])


def rules_for(config: ModelConfig) -> list[_Rule]:
    return _backbone_rules(config.backbone) + _pixel_decoder_rules(config) + _decoder_rules(config)


def _backbone_rules(backbone: BackboneConfig) -> list[_Rule]:
    if backbone.name.startswith("swin"):
        return [
            _Rule("backbone.body.norms.{n}.{rest}", "backbone.norm{n}.{rest}"),
            _Rule("backbone.body.patch_embed.{rest}", "backbone.patch_embed.{rest}"),
            _Rule("backbone.body.layers.{rest}", "backbone.layers.{rest}"),
        ]
    if backbone.name in RESNET_DEPTHS.values():
        # detectron2 ResNet: stem.conv1 (+ .norm), res2..res5 blocks with conv1..conv3 (+ .norm) and a shortcut.
        rules = [
            _Rule("backbone.body.conv1.weight", "backbone.stem.conv1.weight"),
            _Rule("backbone.body.bn1.{rest}", "backbone.stem.conv1.norm.{rest}"),
        ]
        for stage in range(1, 5):
            ours, official = f"backbone.body.layer{stage}.{{n}}", f"backbone.res{stage + 1}.{{n}}"
            rules += [
                _Rule(ours + ".conv{n}.weight", official + ".conv{n}.weight"),
                _Rule(ours + ".bn{n}.{rest}", official + ".conv{n}.norm.{rest}"),
                _Rule(ours + ".downsample.0.weight", official + ".shortcut.weight"),
                _Rule(ours + ".downsample.1.{rest}", official + ".shortcut.norm.{rest}"),
            ]
        return rules
    raise CheckpointError(
        f"backbone {backbone.name!r} has no detectron2 layout (supported: {', '.join(RESNET_DEPTHS.values())}, "
        f"{', '.join(SWIN_SPECS)})"
    )


def _pixel_decoder_rules(config: ModelConfig) -> list[_Rule]:
    if config.pixel_decoder == "msdeformattn":
        return [
            _Rule("pixel_decoder.input_proj.{rest}", PIXEL + "input_proj.{rest}"),
            _Rule("pixel_decoder.level_embed", PIXEL + "transformer.level_embed"),
            _Rule("pixel_decoder.encoder.{n}.{rest}", PIXEL + "transformer.encoder.layers.{n}.{rest}"),
            _Rule("pixel_decoder.lateral_conv.0.weight", PIXEL + "adapter_1.weight"),
            _Rule("pixel_decoder.lateral_conv.1.{rest}", PIXEL + "adapter_1.norm.{rest}"),
            _Rule("pixel_decoder.output_conv.0.weight", PIXEL + "layer_1.weight"),
            _Rule("pixel_decoder.output_conv.1.{rest}", PIXEL + "layer_1.norm.{rest}"),
            _Rule("pixel_decoder.mask_features.{rest}", PIXEL + "mask_features.{rest}"),
        ]
    # MaskFormer's BasePixelDecoder numbers its convs by input level from res2 (adapter_1/layer_1) upwards;
    # res5 only has an output conv (layer_4).
    rules = []
    for level in range(3):
        rules += [
            _Rule(f"pixel_decoder.lateral_convs.{level}.0.weight", PIXEL + f"adapter_{level + 1}.weight"),
            _Rule(f"pixel_decoder.lateral_convs.{level}.1.{{rest}}", PIXEL + f"adapter_{level + 1}.norm.{{rest}}"),
            _Rule(f"pixel_decoder.output_convs.{level}.0.weight", PIXEL + f"layer_{level + 1}.weight"),
            _Rule(f"pixel_decoder.output_convs.{level}.1.{{rest}}", PIXEL + f"layer_{level + 1}.norm.{{rest}}"),
        ]
    return rules + [
        _Rule("pixel_decoder.top_conv.0.weight", PIXEL + "layer_4.weight"),
        _Rule("pixel_decoder.top_conv.1.{rest}", PIXEL + "layer_4.norm.{rest}"),
        _Rule("pixel_decoder.mask_features.{rest}", PIXEL + "mask_features.{rest}"),
    ]


def _decoder_rules(config: ModelConfig) -> list[_Rule]:
    ours, official = "transformer_decoder.", PREDICTOR
    heads = [
        _Rule(ours + "heads.class_embed.{rest}", official + "class_embed.{rest}"),
        _Rule(ours + "heads.mask_embed.{rest}", official + "mask_embed.{rest}"),
    ]
    if config.transformer_decoder == "masked":
        layer = ours + "layers.{n}."
        cross = official + "transformer_cross_attention_layers.{n}."
        self_ = official + "transformer_self_attention_layers.{n}."
        ffn = official + "transformer_ffn_layers.{n}."
        return heads + [
            _Rule(ours + "query_feat.weight", official + "query_feat.weight"),
            _Rule(ours + "query_embed.weight", official + "query_embed.weight"),
            _Rule(ours + "level_embed.weight", official + "level_embed.weight"),
            # MP-Former's label embedding for the piloting queries (training only).
            _Rule(ours + "label_embed.weight", official + "label_enc.weight"),
            _Rule(ours + "input_proj.{n}.{rest}", official + "input_proj.{n}.{rest}"),
            _Rule(ours + "heads.decoder_norm.{rest}", official + "decoder_norm.{rest}"),
            _Rule(layer + "cross_attn.{rest}", cross + "multihead_attn.{rest}"),
            _Rule(layer + "cross_norm.{rest}", cross + "norm.{rest}"),
            _Rule(layer + "self_attn.{rest}", self_ + "self_attn.{rest}"),
            _Rule(layer + "self_norm.{rest}", self_ + "norm.{rest}"),
            _Rule(layer + "linear{n}.{rest}", ffn + "linear{n}.{rest}"),
            _Rule(layer + "ffn_norm.{rest}", ffn + "norm.{rest}"),
        ]
    # MaskFormer: DETR's decoder (norm1 after self-attention, norm2 after cross-attention, norm3 after the FFN).
    layer, official_layer = ours + "layers.{n}.", official + "transformer.decoder.layers.{n}."
    return heads + [
        _Rule(ours + "query_embed.weight", official + "query_embed.weight"),
        _Rule(ours + "input_proj.{rest}", official + "input_proj.{rest}"),
        _Rule(ours + "heads.decoder_norm.{rest}", official + "transformer.decoder.norm.{rest}"),
        _Rule(layer + "self_attn.{rest}", official_layer + "self_attn.{rest}"),
        _Rule(layer + "self_norm.{rest}", official_layer + "norm1.{rest}"),
        _Rule(layer + "cross_attn.{rest}", official_layer + "multihead_attn.{rest}"),
        _Rule(layer + "cross_norm.{rest}", official_layer + "norm2.{rest}"),
        _Rule(layer + "linear{n}.{rest}", official_layer + "linear{n}.{rest}"),
        _Rule(layer + "ffn_norm.{rest}", official_layer + "norm3.{rest}"),
    ]


def rename(key: str, rules: list[_Rule], to_official: bool) -> str | None:
    for rule in rules:
        renamed = rule.apply(key, to_official)
        if renamed is not None:
            return renamed
    return None


def relative_position_index(window: int) -> np.ndarray:
    """[window^2, window^2] index into the (2*window-1)^2 bias table, as the reference Swin stores it."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    relative = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (relative[0] * (2 * window - 1) + relative[1]).astype(np.int64)


__all__ = ["EMPTY_WEIGHT", "PIXEL", "POSITION_INDEX", "PREDICTOR", "RESNET_DEPTHS", "relative_position_index", "rename",
           "rules_for"]
