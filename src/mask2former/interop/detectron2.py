"""Official detectron2 Mask2Former / MaskFormer checkpoints (``model_final_*.pkl``) <-> our model.

The official state dicts name modules as the reference code does: ``backbone.*`` (detectron2 ResNet or
D2SwinTransformer), ``sem_seg_head.pixel_decoder.*`` and ``sem_seg_head.predictor.*``; the renaming tables are in
``detectron2_names.py``. The architecture is read from tensor shapes (``detectron2_shapes.py``); a preset
``config`` adds what shapes cannot tell (heads, dropout, training settings) and is checked against the file.

Class names are not stored in these files: labels come from the preset, when it has them.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ModelConfig, load_config
from ..data.build import config_label_space
from .detectron2_names import (
    EMPTY_WEIGHT,
    PIXEL,
    POSITION_INDEX,
    PREDICTOR,
    relative_position_index,
    rename,
    rules_for,
)
from .detectron2_shapes import check_agreement, config_from_inferred, infer_architecture
from .errors import CheckpointError
from .safe_pickle import load_untrusted


# ----- our model -> official layout ----------------------------------------------------------------------


def to_detectron2_state_dict(model: nn.Module, no_object_weight: float = 0.1) -> dict[str, np.ndarray]:
    """Our model's weights under the official key names and shapes, as numpy arrays (what a detectron2
    ``model_final_*.pkl`` holds under ``"model"``), including the reference's derived buffers
    (``criterion.empty_weight``, Swin's ``relative_position_index``)."""
    config: ModelConfig = model.config
    rules = rules_for(config)
    state: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        name = rename(key, rules, to_official=True)
        if name is None:
            raise CheckpointError(f"{key} has no detectron2 name (model config: {config.pixel_decoder} pixel decoder, "
                                  f"{config.transformer_decoder} decoder, backbone {config.backbone.name})")
        state[name] = value.detach().cpu().numpy()
    if config.backbone.name.startswith("swin"):
        for name, array in list(state.items()):
            if name.endswith(".attn.relative_position_bias_table"):
                window = (math.isqrt(array.shape[0]) + 1) // 2
                state[name.replace("relative_position_bias_table", "relative_position_index")] = (
                    relative_position_index(window)
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
    found = infer_architecture(state, str(path))
    labels = None
    if config is None:
        model_config = config_from_inferred(found)
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
        check_agreement(found, model_config, str(path), where)
        if labels is not None and not len(labels["names"]) == model_config.num_classes == found["num_classes"].value:
            labels = None  # the preset's names describe another class head
    return model_config, _to_our_names(state, model_config, str(path)), labels


def _to_our_names(state: dict[str, np.ndarray | Tensor], config: ModelConfig, where: str) -> dict[str, Tensor]:
    rules = rules_for(config)
    converted: dict[str, Tensor] = {}
    batch_norm_means = []
    for key, value in state.items():
        if key == EMPTY_WEIGHT:
            continue
        if POSITION_INDEX.fullmatch(key):
            window = math.isqrt(value.shape[0]) if value.ndim == 2 else 0
            if window == 0 or not np.array_equal(np.asarray(value), relative_position_index(window)):
                raise CheckpointError(f"{where}: {key} is not the standard Swin relative position index")
            continue
        if key.endswith(".num_batches_tracked") and config.backbone.freeze_bn:
            continue  # a SyncBN counter; frozen batch norm has none and does not need it
        name = rename(key, rules, to_official=False)
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
