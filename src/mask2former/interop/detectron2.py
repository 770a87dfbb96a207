"""Official detectron2 Mask2Former / MaskFormer checkpoints (``model_final_*.pkl``) <-> our model.

The official state dicts name modules as the reference code does: ``backbone.*`` (detectron2 ResNet or
D2SwinTransformer), ``sem_seg_head.pixel_decoder.*`` and ``sem_seg_head.predictor.*``. One table of renaming
rules per part of the model serves both directions. The architecture is read from tensor shapes (backbone
variant, queries, classes, layers, widths); a preset ``config`` adds what shapes cannot tell (heads, dropout,
training settings) and is checked against the file.

Class names are not stored in these files: labels come from the preset, when it has them.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..config import BackboneConfig, ModelConfig, load_config
from ..data.label_space import config_label_space
from ..modeling.swin import SWIN_SPECS
from .checkpoint import CheckpointError
from .safe_pickle import load_untrusted

PIXEL = "sem_seg_head.pixel_decoder."
PREDICTOR = "sem_seg_head.predictor."
RESNET_DEPTHS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}
# Buffers of the reference model that ours does not store: the criterion's class weights (a loss setting) and
# Swin's relative position index (a function of the window size, recomputed by our Swin).
EMPTY_WEIGHT = "criterion.empty_weight"
_POSITION_INDEX = re.compile(r"backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index")


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


def _rules(config: ModelConfig) -> list[_Rule]:
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


def _rename(key: str, rules: list[_Rule], to_official: bool) -> str | None:
    for rule in rules:
        renamed = rule.apply(key, to_official)
        if renamed is not None:
            return renamed
    return None


# ----- our model -> official layout ----------------------------------------------------------------------


def to_detectron2_state_dict(model: nn.Module, no_object_weight: float = 0.1) -> dict[str, np.ndarray]:
    """Our model's weights under the official key names and shapes, as numpy arrays (what a detectron2
    ``model_final_*.pkl`` holds under ``"model"``), including the reference's derived buffers
    (``criterion.empty_weight``, Swin's ``relative_position_index``)."""
    config: ModelConfig = model.config
    rules = _rules(config)
    state: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        name = _rename(key, rules, to_official=True)
        if name is None:
            raise CheckpointError(f"{key} has no detectron2 name (model config: {config.pixel_decoder} pixel decoder, "
                                  f"{config.transformer_decoder} decoder, backbone {config.backbone.name})")
        state[name] = value.detach().cpu().numpy()
    if config.backbone.name.startswith("swin"):
        for name, array in list(state.items()):
            if name.endswith(".attn.relative_position_bias_table"):
                window = (math.isqrt(array.shape[0]) + 1) // 2
                state[name.replace("relative_position_bias_table", "relative_position_index")] = (
                    _relative_position_index(window)
                )
    empty_weight = np.ones(config.num_classes + 1, dtype=np.float32)
    empty_weight[-1] = no_object_weight
    state[EMPTY_WEIGHT] = empty_weight
    return state


def save_detectron2_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Write ``{"model": to_detectron2_state_dict(model), "__author__": ...}`` as a detectron2 ``.pkl``."""
    document = {"model": to_detectron2_state_dict(model), "__author__": "mask2former", "matching_heuristics": False}
    with open(path, "wb") as file:
        pickle.dump(document, file, protocol=4)


def _relative_position_index(window: int) -> np.ndarray:
    """[window^2, window^2] index into the (2*window-1)^2 bias table, as the reference Swin stores it."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    relative = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (relative[0] * (2 * window - 1) + relative[1]).astype(np.int64)


# ----- official layout -> our model ----------------------------------------------------------------------


def read_detectron2_state_dict(path: str | Path) -> dict[str, np.ndarray | Tensor]:
    """The ``"model"`` dict of a detectron2 ``.pkl`` (restricted unpickling) or ``.pth`` (``weights_only``),
    with the legacy key spellings of the reference code updated."""
    document = load_untrusted(path)
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(document).__name__}")
    weights = document.get("model", document)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: 'model' is a {type(weights).__name__}, expected a dict of weights")
    state: dict[str, np.ndarray | Tensor] = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: weight name {key!r} is not a string")
        numeric = value.dtype.kind in "biuf" if isinstance(value, np.ndarray) else isinstance(value, Tensor)
        if not numeric:
            raise CheckpointError(f"{path}: {key} is a {type(value).__name__}, not a numeric array")
        state[_modernise_key(key)] = value
    return state


def _modernise_key(key: str) -> str:
    """Key spellings of older reference checkpoints, as the reference's own loaders rewrite them."""
    key = key.removeprefix("module.")  # saved from a DistributedDataParallel wrapper
    # Before MaskFormerHead version 2 the pixel decoder's modules sat directly under sem_seg_head.
    if key.startswith("sem_seg_head.") and not key.startswith((PIXEL, PREDICTOR)):
        key = PIXEL + key.removeprefix("sem_seg_head.")
    # Before version 2 of the masked decoder the learnable query features were called static_query.
    if key.startswith(PREDICTOR + "static_query."):
        key = key.replace("static_query.", "query_feat.", 1)
    return key


def convert_detectron2_checkpoint(
    path: str | Path, config: str | ModelConfig | None = None
) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any] | None]:
    """Read an official ``model_final_*.pkl`` (or a detectron2 ``.pth``) and return ``(model config, state dict
    in our names, labels)``.

    ``config``: the preset (name or YAML path) the checkpoint was trained with, or a ``ModelConfig``. The file
    must agree with it (backbone, queries, layers, widths); a different class count is allowed (the loader then
    keeps everything but the class head, with a warning). Without ``config`` the architecture is inferred from
    the tensor shapes, with the reference's 8 attention heads.

    ``labels`` (``LabelSpace.to_dict()``): a preset's ``labels``, else its data set's built-in label space (the
    ``coco_*`` presets: COCO's 133 panoptic / 80 instance classes with the thing/stuff split); None without a
    preset, or when its class count differs from the file's.
    """
    path = Path(path)
    state = read_detectron2_state_dict(path)
    found = _infer_architecture(state, str(path))
    labels = None
    if config is None:
        model_config = _config_from_inferred(found)
        where = "the inferred configuration"
    else:
        if isinstance(config, ModelConfig):
            model_config, where = config, "the given model config"
        else:
            full = load_config(config)
            model_config, where = full.model, f"config {str(config)!r}"
            # The preset's data set gives the label space (coco_panoptic: 133 classes, 80 things, ...).
            space = config_label_space(full)
            labels = space.to_dict() if space is not None else None
            model_config = dataclasses.replace(
                model_config, semantic_postprocess_before_inference=full.test.semantic_before_inference()
            )
        _check_agreement(found, model_config, str(path), where)
        if labels is not None and not len(labels["names"]) == model_config.num_classes == found["num_classes"].value:
            labels = None  # the preset's names describe another class head
    return model_config, _to_our_names(state, model_config, str(path)), labels


def _to_our_names(state: dict[str, np.ndarray | Tensor], config: ModelConfig, where: str) -> dict[str, Tensor]:
    rules = _rules(config)
    converted: dict[str, Tensor] = {}
    batch_norm_means = []
    for key, value in state.items():
        if key == EMPTY_WEIGHT:
            continue
        if _POSITION_INDEX.fullmatch(key):
            window = math.isqrt(value.shape[0]) if value.ndim == 2 else 0
            if window == 0 or not np.array_equal(np.asarray(value), _relative_position_index(window)):
                raise CheckpointError(f"{where}: {key} is not the standard Swin relative position index")
            continue
        if key.endswith(".num_batches_tracked") and config.backbone.freeze_bn:
            continue  # a SyncBN counter; frozen batch norm has none and does not need it
        name = _rename(key, rules, to_official=False)
        if name is None:
            raise CheckpointError(
                f"{where}: unexpected tensor {key} (not part of a {config.pixel_decoder}/{config.transformer_decoder} "
                f"model with backbone {config.backbone.name})"
            )
        converted[name] = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        if name.startswith("backbone.") and name.endswith(".running_mean"):
            batch_norm_means.append(name)
    if not config.backbone.freeze_bn:
        # Trainable batch norm counts its updates; FrozenBN checkpoints have no counter, start it at 0.
        for name in batch_norm_means:
            converted.setdefault(name.replace(".running_mean", ".num_batches_tracked"), torch.tensor(0))
    return converted


# ----- what the file holds -------------------------------------------------------------------------------


class Evidence(NamedTuple):
    """A model setting read from the file, and the tensor it was read from (for error messages)."""

    value: Any
    key: str


def _shape(state: dict, key: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{where}: tensor {key} is missing")
    return tuple(state[key].shape)


def _count(state: dict, prefix: str, where: str) -> int:
    """How many modules ``prefix + "0."``, ``prefix + "1."``... the file holds."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = sorted({int(match.group(1)) for key in state if (match := pattern.match(key))})
    if indices != list(range(len(indices))):
        raise CheckpointError(f"{where}: {prefix}N is not numbered 0..N-1 (found {indices})")
    return len(indices)


def _infer_architecture(state: dict, where: str) -> dict[str, Evidence]:
    """Everything the tensor shapes tell about the model."""
    return {**_infer_backbone(state, where), **_infer_pixel_decoder(state, where), **_infer_decoder(state, where)}


def _infer_backbone(state: dict, where: str) -> dict[str, Evidence]:
    if "backbone.stem.conv1.weight" in state:
        if "backbone.stem.conv2.weight" in state:
            raise CheckpointError(
                f"{where}: a ResNet with the DeepLab stem (R101c; backbone.stem.conv2.weight) is not supported"
            )
        depths = tuple(_count(state, f"backbone.res{stage}.", where) for stage in range(2, 6))
        name = RESNET_DEPTHS.get(depths)
        if name is None or "backbone.res2.0.conv3.weight" not in state:
            supported = ", ".join(f"{name} {depths}" for depths, name in RESNET_DEPTHS.items())
            raise CheckpointError(f"{where}: unsupported ResNet (blocks per stage {depths}); supported: {supported}")
        # SyncBN (the reference's Cityscapes configs) counts updates; FrozenBN (COCO, ADE20K) does not.
        counters = [key for key in state if key.startswith("backbone.") and key.endswith(".num_batches_tracked")]
        return {
            "backbone": Evidence(name, "backbone.res2..res5 block counts"),
            "trainable_bn": Evidence(bool(counters), counters[0] if counters else "backbone.*.norm"),
        }
    if "backbone.patch_embed.proj.weight" in state:
        return {
            "backbone": Evidence("swin", "backbone.patch_embed.proj.weight"),
            "swin": Evidence(_infer_swin(state, where), "backbone.layers"),
        }
    raise CheckpointError(
        f"{where}: unknown backbone layout (expected a detectron2 ResNet 'backbone.stem.*' or a Swin "
        "'backbone.patch_embed.*')"
    )


def _infer_swin(state: dict, where: str) -> dict[str, Any]:
    proj = _shape(state, "backbone.patch_embed.proj.weight", where)
    if proj[-2:] != (4, 4):
        raise CheckpointError(f"{where}: Swin patch size {proj[-2:]} (backbone.patch_embed.proj.weight) is not 4x4")
    depths, heads, windows = [], [], []
    for stage in range(_count(state, "backbone.layers.", where)):
        depths.append(_count(state, f"backbone.layers.{stage}.blocks.", where))
        table = _shape(state, f"backbone.layers.{stage}.blocks.0.attn.relative_position_bias_table", where)
        heads.append(table[1])
        windows.append((math.isqrt(table[0]) + 1) // 2)  # the table has (2 * window - 1)^2 rows
    if len(set(windows)) != 1:
        raise CheckpointError(f"{where}: Swin stages have different window sizes {windows}")
    mlp_hidden = _shape(state, "backbone.layers.0.blocks.0.mlp.fc1.weight", where)[0]
    return dict(embed_dim=proj[0], depths=tuple(depths), num_heads=tuple(heads), window_size=windows[0],
                mlp_ratio=mlp_hidden / proj[0])


def _infer_pixel_decoder(state: dict, where: str) -> dict[str, Evidence]:
    encoder = PIXEL + "transformer.encoder.layers."
    mask_features = PIXEL + "mask_features.weight"
    found = {"conv_dim": Evidence(_shape(state, mask_features, where)[1], mask_features)}
    offsets = encoder + "0.self_attn.sampling_offsets.weight"
    if offsets in state:
        found["pixel_decoder"] = Evidence("msdeformattn", offsets)
        found["enc_layers"] = Evidence(_count(state, encoder, where), encoder + "N")
        ffn = encoder + "0.linear1.weight"
        found["enc_ffn_dim"] = Evidence(_shape(state, ffn, where)[0], ffn)
        found["sampling_offsets"] = Evidence(_shape(state, offsets, where)[0], offsets)
    elif encoder + "0.self_attn.in_proj_weight" in state:
        raise CheckpointError(
            f"{where}: MaskFormer's TransformerEncoderPixelDecoder ({encoder}0.self_attn) is not supported; "
            "checkpoints with the FPN (BasePixelDecoder) or MSDeformAttn pixel decoder are"
        )
    elif PIXEL + "layer_4.weight" in state:
        found["pixel_decoder"] = Evidence("fpn", PIXEL + "layer_4.weight")
    else:
        raise CheckpointError(f"{where}: no known pixel decoder under {PIXEL} (MSDeformAttn or FPN)")
    return found


def _infer_decoder(state: dict, where: str) -> dict[str, Evidence]:
    class_embed, mask_embed = PREDICTOR + "class_embed.weight", PREDICTOR + "mask_embed.layers.2.weight"
    classes, hidden_dim = _shape(state, class_embed, where)
    found = {
        "num_classes": Evidence(classes - 1, class_embed),  # + "no object"
        "hidden_dim": Evidence(hidden_dim, class_embed),
        "mask_dim": Evidence(_shape(state, mask_embed, where)[0], mask_embed),
    }
    masked, standard = PREDICTOR + "transformer_ffn_layers.", PREDICTOR + "transformer.decoder.layers."
    if masked + "0.linear1.weight" in state:
        layers, queries, input_proj = masked, PREDICTOR + "query_feat.weight", PREDICTOR + "input_proj.0.weight"
        found["transformer_decoder"] = Evidence("masked", layers + "0")
        # MP-Former's released decoder has no query positional embedding, and a label embedding.
        found["query_pos"] = Evidence(PREDICTOR + "query_embed.weight" in state, PREDICTOR + "query_embed.weight")
        found["mask_piloting"] = Evidence(PREDICTOR + "label_enc.weight" in state, PREDICTOR + "label_enc.weight")
    elif standard + "0.linear1.weight" in state:
        if any(key.startswith(PREDICTOR + "transformer.encoder.layers.") for key in state):
            raise CheckpointError(f"{where}: a MaskFormer predictor with its own transformer encoder "
                                  f"({PREDICTOR}transformer.encoder.layers) is not supported")
        layers, queries, input_proj = standard, PREDICTOR + "query_embed.weight", PREDICTOR + "input_proj.weight"
        found["transformer_decoder"] = Evidence("standard", layers + "0")
    else:
        raise CheckpointError(f"{where}: no Mask2Former or MaskFormer transformer decoder under {PREDICTOR}")
    found["input_proj"] = Evidence(input_proj in state, input_proj)
    found["dec_layers"] = Evidence(_count(state, layers, where), layers + "N")
    ffn = layers + "0.linear1.weight"
    found["dim_feedforward"] = Evidence(_shape(state, ffn, where)[0], ffn)
    found["num_queries"] = Evidence(_shape(state, queries, where)[0], queries)
    return found


# ----- inferred vs configured ----------------------------------------------------------------------------

_COMMON_FIELDS = ("pixel_decoder", "transformer_decoder", "hidden_dim", "num_queries", "dec_layers", "dim_feedforward",
                  "mask_dim", "conv_dim")


def _swin_spec(backbone: BackboneConfig) -> dict[str, Any]:
    """The Swin shape a backbone config builds (the variant's spec, then the ``kwargs`` overrides)."""
    variant = "_".join(backbone.name.split("_")[:2])
    if variant not in SWIN_SPECS:
        raise CheckpointError(f"unknown Swin variant {backbone.name!r}; choose one of {sorted(SWIN_SPECS)}")
    spec = SWIN_SPECS[variant]
    values: dict[str, Any] = dict(embed_dim=spec.embed_dim, depths=spec.depths, num_heads=spec.num_heads,
                                  window_size=spec.window_size, mlp_ratio=4.0)
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in backbone.kwargs.items() if k in values})
    return values


def _memory_channels(found: dict[str, Evidence], config: ModelConfig) -> int:
    """Width of the maps the decoder attends to: the encoder output, or res5 behind the FPN decoder."""
    if config.pixel_decoder == "msdeformattn":
        return config.conv_dim
    if found["backbone"].value == "swin":
        return found["swin"].value["embed_dim"] * 8
    return 2048


def _check_agreement(found: dict[str, Evidence], config: ModelConfig, path: str, where: str) -> None:
    problems = []

    def compare(field: str, configured: Any, what: str | None = None) -> None:
        if configured != found[field].value:
            problems.append(f"{what or field} is {found[field].value} in the file ({found[field].key}) "
                            f"but {configured} in {where}")

    name = config.backbone.name
    if found["backbone"].value == "swin" and name.startswith("swin"):
        configured = _swin_spec(config.backbone)
        for field, value in found["swin"].value.items():
            if configured[field] != value:
                problems.append(f"Swin {field} is {value} in the file but {configured[field]} in {where} ({name})")
    elif found["backbone"].value != name:
        problems.append(f"the file has a {found['backbone'].value} backbone ({found['backbone'].key}) "
                        f"but {where} uses {name}")
    for field in _COMMON_FIELDS:
        compare(field, getattr(config, field))
    if found["pixel_decoder"].value == "msdeformattn":
        compare("enc_layers", config.enc_layers)
        compare("enc_ffn_dim", config.enc_ffn_dim)
        compare("sampling_offsets", config.num_heads * 3 * config.enc_points * 2,
                f"the offset count (num_heads {config.num_heads} x 3 levels x enc_points {config.enc_points} x 2)")
    if found["transformer_decoder"].value == "masked":
        compare("query_pos", config.query_pos)
        compare("mask_piloting", config.mask_piloting)
    if _memory_channels(found, config) == config.hidden_dim:
        # Only then is the decoder's input projection optional.
        compare("input_proj", config.enforce_input_proj, "enforce_input_proj")
    if problems:
        raise CheckpointError(f"{path} does not match {where}: " + "; ".join(problems))


def _config_from_inferred(found: dict[str, Evidence]) -> ModelConfig:
    """A model config from the shapes alone, with the reference's defaults (8 heads) for the rest."""
    if found["backbone"].value == "swin":
        spec = found["swin"].value
        shape = (spec["embed_dim"], spec["depths"], spec["num_heads"], spec["window_size"])
        known = [n for n, s in SWIN_SPECS.items() if (s.embed_dim, s.depths, s.num_heads, s.window_size) == shape]
        # A non-standard Swin is spelled as swin_tiny with every shape argument overridden.
        kwargs = {} if known else {
            key: list(value) if isinstance(value, tuple) else value for key, value in spec.items() if key != "mlp_ratio"
        }
        if spec["mlp_ratio"] != 4.0:
            kwargs["mlp_ratio"] = spec["mlp_ratio"]
        backbone = BackboneConfig(name=known[0] if known else "swin_tiny", kwargs=kwargs)
    else:
        backbone = BackboneConfig(name=found["backbone"].value, freeze_bn=not found["trainable_bn"].value)
    values: dict[str, Any] = {field: found[field].value for field in _COMMON_FIELDS + ("num_classes",)}
    config = ModelConfig(backbone=backbone, **values)
    if config.pixel_decoder == "msdeformattn":
        offsets = found["sampling_offsets"]
        per_point = config.num_heads * 3 * 2
        if offsets.value % per_point:
            raise CheckpointError(f"{offsets.key} has {offsets.value} outputs, not {config.num_heads} heads x 3 levels "
                                  "x points x 2: pass the config the checkpoint was trained with")
        config = dataclasses.replace(config, enc_layers=found["enc_layers"].value,
                                     enc_ffn_dim=found["enc_ffn_dim"].value, enc_points=offsets.value // per_point)
    if config.transformer_decoder == "masked":
        config = dataclasses.replace(config, query_pos=found["query_pos"].value,
                                     mask_piloting=found["mask_piloting"].value)
    if _memory_channels(found, config) == config.hidden_dim:
        config = dataclasses.replace(config, enforce_input_proj=found["input_proj"].value)
    return config
