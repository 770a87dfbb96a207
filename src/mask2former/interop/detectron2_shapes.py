"""What a detectron2 Mask2Former / MaskFormer state dict tells about the architecture from its tensor shapes
(backbone variant, queries, classes, layers, widths), checked against a config or turned into one."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

from ..config import SWIN_SPECS, BackboneConfig, ModelConfig
from .detectron2_names import PIXEL, PREDICTOR, RESNET_DEPTHS
from .errors import CheckpointError


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


def infer_architecture(state: dict, where: str) -> dict[str, Evidence]:
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


def check_agreement(found: dict[str, Evidence], config: ModelConfig, path: str, where: str) -> None:
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


def config_from_inferred(found: dict[str, Evidence]) -> ModelConfig:
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


__all__ = ["Evidence", "check_agreement", "config_from_inferred", "infer_architecture"]
