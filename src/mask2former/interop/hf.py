"""Hugging Face transformers Mask2Former checkpoints (``config.json`` + ``model.safetensors``) -> our model.

What ``Mask2FormerForUniversalSegmentation.save_pretrained`` writes is read with ``safetensors`` (never pickle):
every tensor is renamed onto our state dict, Swin's separate query/key/value projections are concatenated into
``qkv``, and the decoder self-attention's q/k/v projections into ``in_proj_weight``/``in_proj_bias`` (the
cross-attention is an ``nn.MultiheadAttention`` on both sides and maps as is). Both Swin spellings are accepted:
the one transformers writes to disk (``encoder.layers.0.blocks.0.attention.self.query``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``) and the in-memory one of transformers 5
(``encoder.swin.encoder.layers...attention.q_proj``, ``o_proj``, ``mlp.fc1``...).

Behaviour notes (checked against transformers 5.x):
- transformers' ``SwinBackbone`` always pads to window multiples and keeps the shift (``always_partition=True``),
  as the detectron2 Swin does, so the converted backbone uses ``adaptive_window=False``.
- The label space comes from ``id2label``. transformers has no thing/stuff split: when the names, in order, are a
  built-in data set's class list (COCO panoptic / instance, ADE20K, Cityscapes; ``builtin_label_space``) that data
  set's split, dataset ids and colours are used (logged); otherwise every class is marked a thing, which is also
  what transformers' own panoptic post-processing does unless given ``label_ids_to_fuse``. Set ``is_thing`` in the
  saved ``labels`` for panoptic inference with stuff merging.
- Pixel mean/std come from ``preprocessor_config.json`` when the directory has one (on the 0-255 scale),
  otherwise the ImageNet values transformers uses (= our defaults).
- Unused tensors that transformers saves are skipped: the SwinModel's final ``layernorm`` (the backbone returns
  the per-stage ``hidden_states_norms``), ``relative_position_index`` buffers and the loss' ``empty_weight``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..config import SWIN_SPECS, BackboneConfig, ModelConfig, SwinSpec
from .errors import CheckpointError

__all__ = ["convert_hf_checkpoint", "hf_config_to_model_config", "convert_hf_state_dict"]

logger = logging.getLogger("mask2former.interop.hf")

# transformers' SwinConfig defaults; a Mask2FormerConfig without ``backbone_config`` uses these with depths 2,2,18,2.
_SWIN_DEFAULTS = dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0,
                      drop_path_rate=0.3, patch_size=4, num_channels=3, qkv_bias=True, hidden_act="gelu",
                      use_absolute_embeddings=False, layer_norm_eps=1e-5)


# ----------------------------------------------------------------------------------------------- config


def hf_config_to_model_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our ``ModelConfig`` from a transformers ``Mask2FormerConfig`` dict; what we cannot represent is an error."""

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise CheckpointError(f"{where}: {message}")

    require(hf.get("model_type") == "mask2former", f"model_type is {hf.get('model_type')!r}, expected 'mask2former'")
    backbone = dict(_SWIN_DEFAULTS)
    backbone_config = hf.get("backbone_config")
    if backbone_config is None:
        require(not hf.get("backbone") and not hf.get("use_timm_backbone"),
                f"backbone {hf.get('backbone')!r} is not a transformers Swin backbone (only Swin is supported)")
    else:
        require(backbone_config.get("model_type") == "swin",
                f"backbone model_type {backbone_config.get('model_type')!r} is not supported (only 'swin')")
        backbone.update({key: value for key, value in backbone_config.items() if key in _SWIN_DEFAULTS})
    depths, heads = list(backbone["depths"]), list(backbone["num_heads"])
    require(len(depths) == 4 and len(heads) == 4, f"Swin needs 4 stages, got depths {depths}, num_heads {heads}")
    out_features = (backbone_config or {}).get("out_features") or ["stage1", "stage2", "stage3", "stage4"]
    require(list(out_features) == ["stage1", "stage2", "stage3", "stage4"],
            f"backbone out_features {out_features} must be stage1..stage4")
    require(backbone["patch_size"] in (4, [4, 4]), f"Swin patch_size {backbone['patch_size']} (only 4 is supported)")
    require(backbone["num_channels"] == 3, f"Swin num_channels {backbone['num_channels']} (only 3 is supported)")
    require(backbone["qkv_bias"] is True, "Swin qkv_bias=False is not supported")
    require(backbone["hidden_act"] == "gelu", f"Swin hidden_act {backbone['hidden_act']!r} (only 'gelu')")
    require(not backbone["use_absolute_embeddings"], "Swin use_absolute_embeddings=True is not supported")
    require(abs(backbone["layer_norm_eps"] - 1e-5) < 1e-12,
            f"Swin layer_norm_eps {backbone['layer_norm_eps']} (only 1e-5)")
    require(hf.get("activation_function", "relu") == "relu",
            f"activation_function {hf.get('activation_function')!r} (only 'relu')")
    require(not hf.get("pre_norm", False), "pre_norm=True (a pre-norm decoder) is not supported")
    require(list(hf.get("feature_strides", [4, 8, 16, 32])) == [4, 8, 16, 32],
            f"feature_strides {hf.get('feature_strides')} (only 4, 8, 16, 32)")
    require(hf.get("common_stride", 4) == 4, f"common_stride {hf.get('common_stride')} (only 4: one FPN level)")
    decoder_layers = int(hf.get("decoder_layers", 10))
    require(decoder_layers >= 2, f"decoder_layers {decoder_layers} must be >= 2 (it counts the initial prediction)")

    spec = SwinSpec(int(backbone["embed_dim"]), tuple(depths), tuple(heads), int(backbone["window_size"]))
    name = next((variant for variant, known in SWIN_SPECS.items() if known == spec), "swin_tiny")
    swin_kwargs = dict(embed_dim=spec.embed_dim, depths=list(spec.depths), num_heads=list(spec.num_heads),
                       window_size=spec.window_size, mlp_ratio=float(backbone["mlp_ratio"]),
                       # transformers' SwinBackbone pads and shifts at every size (always_partition=True).
                       adaptive_window=False)
    id2label = hf.get("id2label") or {}
    return ModelConfig(
        num_classes=len(id2label),
        backbone=BackboneConfig(name=name, pretrained=False, drop_path_rate=float(backbone["drop_path_rate"]),
                                kwargs=swin_kwargs),
        pixel_decoder="msdeformattn",
        transformer_decoder="masked",
        hidden_dim=int(hf.get("hidden_dim", 256)),
        num_queries=int(hf.get("num_queries", 100)),
        num_heads=int(hf.get("num_attention_heads", 8)),
        dim_feedforward=int(hf.get("dim_feedforward", 2048)),
        dec_layers=decoder_layers - 1,  # transformers counts the initial-query prediction as a layer
        mask_dim=int(hf.get("mask_feature_size", 256)),
        conv_dim=int(hf.get("feature_size", 256)),
        enc_layers=int(hf.get("encoder_layers", 6)),
        enc_ffn_dim=int(hf.get("encoder_feedforward_dim", 1024)),
        enc_points=4,  # hard-coded in transformers (and in the reference)
        enc_dropout=float(hf.get("dropout", 0.0)),
        enforce_input_proj=bool(hf.get("enforce_input_projection", False)),
    )


def _labels(hf: dict[str, Any], where: str) -> dict[str, Any]:
    from ..data.label_space import LabelSpace, builtin_label_space, match_builtin_names

    id2label = hf.get("id2label") or {}
    try:
        ids = sorted(int(key) for key in id2label)
    except ValueError:
        raise CheckpointError(f"{where}: id2label keys must be integers, got {sorted(id2label)[:5]}") from None
    if ids != list(range(len(ids))) or not ids:
        raise CheckpointError(f"{where}: id2label must map 0..K-1, got ids {ids[:5]}{'...' if len(ids) > 5 else ''}")
    names = [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in ids]
    ignore_index = int(hf.get("ignore_value", 255))
    known = match_builtin_names(names)
    try:
        if known is not None:
            # The class list of a reference data set (e.g. COCO panoptic's 133 names in order): its split, ids, colours.
            table = builtin_label_space(known)
            space = LabelSpace(names, is_thing=table.is_thing, dataset_ids=table.dataset_ids,
                               ignore_index=ignore_index, colors=table.colors)
            logger.info("%s: id2label is the %s class list: using its thing/stuff split (%d things, %d stuff), "
                        "dataset ids and colours", where, known, len(space.thing_ids), len(space.stuff_ids))
        else:
            space = LabelSpace(names, is_thing=[True] * len(names), ignore_index=ignore_index)
            logger.info("%s: id2label is no known data set's class list: every class is a thing (no stuff merging "
                        "in panoptic output unless the saved labels set is_thing)", where)
    except ValueError as error:
        raise CheckpointError(f"{where}: id2label does not make a valid label space ({error})") from None
    return space.to_dict()


def _pixel_statistics(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    path = directory / "preprocessor_config.json"
    if not path.exists():
        return None
    try:
        processor = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if mean is None or std is None:
        return None
    # transformers normalises images rescaled by rescale_factor (1/255); ours normalises the 0-255 values.
    scale = 1.0 / float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{path}: image_mean/image_std must have 3 values")
    return tuple(float(m) * scale for m in mean), tuple(float(s) * scale for s in std)


# ----------------------------------------------------------------------------------------------- weights

_BACKBONE = "pixel_level_module.encoder."
_PIXEL_DECODER = "pixel_level_module.decoder."
_TRANSFORMER = "transformer_module."
# Swin block sub-module names, both spellings, -> ours. Longest first: "attention.output.dense" before "output.dense".
_SWIN_BLOCK = [
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.output.dense", "attn.proj"),
    ("attention.o_proj", "attn.proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
]
_SWIN_QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2,
             "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_ENCODER_LAYER = {"self_attn.sampling_offsets": "self_attn.sampling_offsets",
                  "self_attn.attention_weights": "self_attn.attention_weights",
                  "self_attn.value_proj": "self_attn.value_proj", "self_attn.output_proj": "self_attn.output_proj",
                  "self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2"}
_DECODER_LAYER = {"cross_attn.in_proj_weight": "cross_attn.in_proj_weight",
                  "cross_attn.in_proj_bias": "cross_attn.in_proj_bias", "cross_attn.out_proj": "cross_attn.out_proj",
                  "cross_attn_layer_norm": "cross_norm", "self_attn.out_proj": "self_attn.out_proj",
                  "self_attn_layer_norm": "self_norm", "fc1": "linear1", "fc2": "linear2",
                  "final_layer_norm": "ffn_norm"}
_DECODER_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
_IGNORED = [
    re.compile(r"^criterion\.empty_weight$"),  # the loss' class weights (no_object_weight), not a model tensor
    re.compile(r"^pixel_level_module\.encoder\.(swin\.)?layernorm\.(weight|bias)$"),  # SwinModel's unused final norm
    re.compile(r"relative_position_index$"),  # a buffer derived from the window size
]


def _split_param(rest: str, where: str, key: str) -> tuple[str, str]:
    module, _, param = rest.rpartition(".")
    if param not in ("weight", "bias") or not module:
        raise CheckpointError(f"{where}: unknown tensor {key}")
    return module, param


def _map_backbone(rest: str, where: str, key: str) -> tuple[str, int | None]:
    """Backbone key (after ``pixel_level_module.encoder.``) -> (our key, q/k/v index or None)."""
    if rest.startswith("swin."):
        rest = rest[len("swin."):]
    if match := re.fullmatch(r"hidden_states_norms\.stage([1-4])\.(weight|bias)", rest):
        return f"backbone.body.norms.{int(match.group(1)) - 1}.{match.group(2)}", None
    if match := re.fullmatch(r"embeddings\.patch_embeddings\.projection\.(weight|bias)", rest):
        return f"backbone.body.patch_embed.proj.{match.group(1)}", None
    if match := re.fullmatch(r"embeddings\.norm\.(weight|bias)", rest):
        return f"backbone.body.patch_embed.norm.{match.group(1)}", None
    if match := re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)", rest):
        return f"backbone.body.layers.{match.group(1)}.downsample.{match.group(2)}", None
    if match := re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", rest):
        prefix = f"backbone.body.layers.{match.group(1)}.blocks.{match.group(2)}."
        inner = match.group(3)
        for hf_name, ours in _SWIN_BLOCK:
            if inner == hf_name:  # a bare parameter (the bias table)
                return prefix + ours, None
            if inner.startswith(hf_name + ".") and inner[len(hf_name) + 1:] in ("weight", "bias"):
                return f"{prefix}{ours}.{inner[len(hf_name) + 1:]}", None
        module, param = _split_param(inner, where, key)
        if module in _SWIN_QKV:
            return f"{prefix}attn.qkv.{param}", _SWIN_QKV[module]
    raise CheckpointError(f"{where}: unknown tensor {key}")


def _map_key(key: str, where: str) -> tuple[str, int | None] | None:
    """transformers key -> (our key, index in a q/k/v concatenation or None); None for tensors we skip."""
    name = key[len("model."):] if key.startswith("model.") else key
    if any(pattern.search(name) for pattern in _IGNORED):
        return None
    if match := re.fullmatch(r"class_predictor\.(weight|bias)", name):
        return f"transformer_decoder.heads.class_embed.{match.group(1)}", None
    if name.startswith(_BACKBONE):
        return _map_backbone(name[len(_BACKBONE):], where, key)
    if name.startswith(_PIXEL_DECODER):
        rest = name[len(_PIXEL_DECODER):]
        if rest == "level_embed":
            return "pixel_decoder.level_embed", None
        fixed = {r"input_projections\.(\d)\.([01])\.(weight|bias)": r"pixel_decoder.input_proj.\1.\2.\3",
                 r"adapter_1\.([01])\.(weight|bias)": r"pixel_decoder.lateral_conv.\1.\2",
                 r"layer_1\.([01])\.(weight|bias)": r"pixel_decoder.output_conv.\1.\2",
                 r"mask_projection\.(weight|bias)": r"pixel_decoder.mask_features.\1"}
        for pattern, ours in fixed.items():
            if re.fullmatch(pattern, rest):
                return re.sub(pattern, ours, rest), None
        if match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest):
            module, param = _split_param(match.group(2), where, key)
            if module in _ENCODER_LAYER:
                return f"pixel_decoder.encoder.{match.group(1)}.{_ENCODER_LAYER[module]}.{param}", None
        raise CheckpointError(f"{where}: unknown tensor {key}")
    if name.startswith(_TRANSFORMER):
        rest = name[len(_TRANSFORMER):]
        fixed = {r"queries_features\.weight": "transformer_decoder.query_feat.weight",
                 r"queries_embedder\.weight": "transformer_decoder.query_embed.weight",
                 r"level_embed\.weight": "transformer_decoder.level_embed.weight",
                 r"input_projections\.(\d)\.(weight|bias)": r"transformer_decoder.input_proj.\1.\2",
                 r"decoder\.layernorm\.(weight|bias)": r"transformer_decoder.heads.decoder_norm.\1",
                 r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(weight|bias)":
                     r"transformer_decoder.heads.mask_embed.layers.\1.\2"}
        for pattern, ours in fixed.items():
            if re.fullmatch(pattern, rest):
                return re.sub(pattern, ours, rest), None
        if match := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", rest):
            prefix = f"transformer_decoder.layers.{match.group(1)}."
            inner = match.group(2)
            if inner in ("cross_attn.in_proj_weight", "cross_attn.in_proj_bias"):
                return prefix + inner, None
            module, param = _split_param(inner, where, key)
            if module in _DECODER_LAYER:
                return f"{prefix}{_DECODER_LAYER[module]}.{param}", None
            if module in _DECODER_QKV:
                return f"{prefix}self_attn.in_proj_{param}", _DECODER_QKV[module]
        raise CheckpointError(f"{where}: unknown tensor {key}")
    raise CheckpointError(f"{where}: unknown tensor {key}")


def convert_hf_state_dict(hf_state: dict[str, Tensor], where: str = "model.safetensors") -> dict[str, Tensor]:
    """Rename (and concatenate q/k/v of) a transformers Mask2Former state dict onto our names."""
    state: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    qkv_parts: dict[str, list[tuple[str, Tensor] | None]] = {}
    for key, tensor in hf_state.items():
        mapped = _map_key(key, where)
        if mapped is None:
            continue
        ours, index = mapped
        if index is None:
            if ours in state:
                raise CheckpointError(f"{where}: tensors {sources[ours]} and {key} both map to {ours}")
            state[ours], sources[ours] = tensor, key
        else:
            parts = qkv_parts.setdefault(ours, [None, None, None])
            if parts[index] is not None:
                raise CheckpointError(f"{where}: tensors {parts[index][0]} and {key} both map to {ours} part {index}")
            parts[index] = (key, tensor)
    for ours, parts in qkv_parts.items():
        present = [part for part in parts if part is not None]
        if len(present) != 3:
            missing = "qkv"[[part is None for part in parts].index(True)]
            raise CheckpointError(f"{where}: {ours} has no '{missing}' projection (found only {present[0][0]}...)")
        shapes = {tuple(part[1].shape) for part in present}
        if len(shapes) != 1:
            raise CheckpointError(f"{where}: q/k/v projections for {ours} have different shapes {sorted(shapes)}")
        state[ours] = torch.cat([part[1] for part in present], 0)
    return state


def _read_safetensors(directory: Path) -> dict[str, Tensor]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    try:
        if single.exists():
            return load_file(str(single), device="cpu")
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load_file(str(directory / shard), device="cpu"))
            return state
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError) as error:
        raise CheckpointError(f"{directory}: cannot read the safetensors weights ({error})") from None
    if (directory / "pytorch_model.bin").exists():
        raise CheckpointError(f"{directory}: only pytorch_model.bin found; pickled weights are not read, "
                              "re-save the model with safe_serialization (model.safetensors)")
    raise CheckpointError(f"{directory}: model.safetensors is missing")


def convert_hf_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any]]:
    """A transformers Mask2Former directory -> (our ModelConfig, our state dict, label space as ``to_dict()``).

    Every tensor in the file must map onto our names (else a ``CheckpointError`` naming it); that nothing is
    missing and every shape fits is checked when the state dict is loaded (``Mask2Former.from_pretrained``)."""
    directory = Path(path)
    config_path = directory / "config.json"
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: cannot read ({error})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    config = hf_config_to_model_config(hf, str(config_path))
    statistics = _pixel_statistics(directory)
    if statistics is not None:
        config.pixel_mean, config.pixel_std = statistics
    labels = _labels(hf, str(config_path))
    where = str(directory / "model.safetensors")
    state = convert_hf_state_dict(_read_safetensors(directory), where)
    class_bias = state.get("transformer_decoder.heads.class_embed.bias")
    if class_bias is not None and class_bias.shape[0] != config.num_classes + 1:
        raise CheckpointError(f"{where}: the class head has {class_bias.shape[0] - 1} classes but id2label in "
                              f"{config_path} has {config.num_classes}")
    return config, state, labels
