"""ImageNet backbone weights from the files people have, mapped onto our backbones (``model.backbone.weights``).

Layouts read (files never run code: ``safetensors``, ``torch.load(weights_only=True)`` or our restricted unpickler):

- ResNet, torchvision / timm names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0``, ``fc``) in a ``.pth``,
  ``.bin`` or ``.safetensors``. timm's CNNs use these names, so any timm CNN file loads into the same timm model.
- ResNet, detectron2 names (``stem.conv1.norm``, ``res2.0.conv1``, ``res2.0.shortcut``): the ``R-50.pkl`` that
  Mask2Former trains from, which is torchvision's ResNet-50 renamed by detectron2's
  ``tools/convert-torchvision-to-d2.py`` (``__author__ == "torchvision"``: RGB input, torchvision mean/std, stride in
  the 3x3 convolution, as timm's ResNet). The MSRA/Caffe2 ``R-50.pkl`` (same file name, BGR input, pixel std 1,
  stride in the 1x1 convolution) is refused: its stride placement is another network.
- Swin, official names (``swin_*.pth`` from the Swin release: ``{"model": state dict}``), Mask2Former's converted
  ``.pkl`` (``tools/convert-pretrained-swin-model-to-d2.py``: the same names, the release's torch tensors
  ``pickle.dump``-ed as they are; numpy arrays load too) and timm's layout
  (patch merging at the start of stages 1-3, ``head.fc``). Our Swin keeps the official names, so the mapping is the
  identity. Dropped from the file: the classifier (``head``, the final ``norm``), the derived
  ``relative_position_index`` (checked) and ``attn_mask`` buffers. Not in the file: the per-stage output norms
  ``norms.0-3``, which Mask2Former's D2SwinTransformer also adds freshly initialised.

Everything is mapped and checked (every model tensor present with its shape, every file tensor placed or knowingly
dropped) before anything is copied, so a failed load leaves the model as it was.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CheckpointError

WEIGHTS_DIR_ENV = "MASK2FORMER_WEIGHTS_DIR"

# Where the files the presets name come from (we never download them).
KNOWN_SOURCES = {
    "R-50.pkl": "detectron2's torchvision ResNet-50, https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/"
                "torchvision/R-50.pkl (or torchvision's resnet50 .pth converted with detectron2's "
                "tools/convert-torchvision-to-d2.py; a torchvision/timm resnet50 .pth/.safetensors also loads)",
    "swin_tiny_patch4_window7_224.pth": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                                        "swin_tiny_patch4_window7_224.pth (Mask2Former's converted .pkl also loads)",
    "swin_small_patch4_window7_224.pth": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                                         "swin_small_patch4_window7_224.pth (Mask2Former's converted .pkl also loads)",
    "swin_base_patch4_window12_384_22k.pth": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                                             "swin_base_patch4_window12_384_22k.pth (Mask2Former's converted .pkl "
                                             "also loads)",
    "swin_large_patch4_window12_384_22k.pth": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                                              "swin_large_patch4_window12_384_22k.pth (Mask2Former's converted .pkl "
                                              "also loads)",
}

TORCHVISION_R50_URL = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl"
_ALTERNATE_SUFFIX = {".pth": ".pkl", ".pkl": ".pth"}
_CAFFE2_KEY = re.compile(r"(conv1_w|res_conv1_bn_[sb]|res\d_\d+_branch\w+|fc1000_[wb]|pred_[wb])")
_D2_RESNET_KEY = re.compile(r"(stem|res[2-5])\.")
_D2_TO_TORCHVISION = [
    (re.compile(r"stem\.conv1\.weight"), "conv1.weight"),
    (re.compile(r"stem\.conv1\.norm\.(\w+)"), r"bn1.\1"),
    (re.compile(r"stem\.fc\.(\w+)"), r"fc.\1"),
    (re.compile(r"res([2-5])\.(\d+)\.conv([1-3])\.weight"), r"layer{\1}.\2.conv\3.weight"),
    (re.compile(r"res([2-5])\.(\d+)\.conv([1-3])\.norm\.(\w+)"), r"layer{\1}.\2.bn\3.\4"),
    (re.compile(r"res([2-5])\.(\d+)\.shortcut\.weight"), r"layer{\1}.\2.downsample.0.weight"),
    (re.compile(r"res([2-5])\.(\d+)\.shortcut\.norm\.(\w+)"), r"layer{\1}.\2.downsample.1.\3"),
]
_STAGE = re.compile(r"layer\{([2-5])\}")
_SWIN_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.")
_SWIN_INDEX = re.compile(r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index")
_SWIN_MASK = re.compile(r"layers\.\d+\.blocks\.\d+\.attn_mask")


class BackboneWeightsError(ValueError):
    """A weights file that cannot initialise the backbone (missing, unsafe, another layout or architecture)."""


@dataclass
class WeightsFile:
    path: Path
    state: dict[str, Tensor]
    container: str  # how the file stores its tensors, for messages
    author: str | None = None  # detectron2's ``__author__``


# ---------------------------------------------------------------------------------------------------------- locating
def weights_candidates(weights: str) -> list[Path]:
    """Where ``weights`` is looked for, in order: as given (relative to the working directory), then under
    ``$MASK2FORMER_WEIGHTS_DIR``; each also with ``.pth`` and ``.pkl`` swapped (the Swin release ``.pth`` and
    Mask2Former's converted ``.pkl`` hold the same tensors)."""
    path = Path(weights).expanduser()
    bases = [path]
    directory = os.environ.get(WEIGHTS_DIR_ENV)
    if directory and not path.is_absolute():
        bases.append(Path(directory).expanduser() / path)
    candidates = []
    for base in bases:
        candidates.append(base)
        if base.suffix in _ALTERNATE_SUFFIX:
            candidates.append(base.with_suffix(_ALTERNATE_SUFFIX[base.suffix]))
    return candidates


def resolve_weights(weights: str) -> Path | None:
    """The first existing file of :func:`weights_candidates` (absolute), or None."""
    if "://" in weights:
        raise BackboneWeightsError(f"model.backbone.weights={weights!r}: URLs are not downloaded; download the file "
                                   f"and give its path")
    return next((candidate.absolute() for candidate in weights_candidates(weights) if candidate.is_file()), None)


def missing_weights_message(weights: str) -> str:
    """One line: which file, where it was looked for, where it comes from, and how to train without it."""
    where = f"in {Path.cwd()}" + (f" or ${WEIGHTS_DIR_ENV}" if os.environ.get(WEIGHTS_DIR_ENV) else
                                  f" (or set ${WEIGHTS_DIR_ENV})")
    source = KNOWN_SOURCES.get(Path(weights).name)
    origin = f"; it is {source}" if source else ""
    return f"backbone ImageNet weights {weights!r} not found {where}{origin}"


def require_weights(weights: str) -> Path:
    """The resolved path of ``weights``, or a one-line :class:`BackboneWeightsError` saying where to get it and
    how to train without it."""
    path = resolve_weights(weights)
    if path is None:
        raise BackboneWeightsError(f"{missing_weights_message(weights)}; to train from a random backbone instead, "
                                   f"set model.backbone.pretrained=false")
    return path


# ----------------------------------------------------------------------------------------------------------- reading
def read_weights_file(path: str | Path) -> WeightsFile:
    """The flat state dict of a ``.safetensors``, torch (``.pth``/``.bin``) or pickle (``.pkl``) weights file."""
    from .safe_pickle import load_untrusted

    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: weights file does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return WeightsFile(path, load_file(str(path)), "safetensors")
        except Exception as error:  # safetensors raises its own error types with long messages
            raise BackboneWeightsError(f"{path}: not a readable safetensors file ({type(error).__name__})") from None
    try:
        obj = load_untrusted(path)
    except CheckpointError as error:
        raise BackboneWeightsError(str(error)) from None
    if not isinstance(obj, dict):
        raise BackboneWeightsError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    author = None
    container = "torch file" if path.suffix != ".pkl" else "pickle"
    if "model" in obj and "__author__" in obj:  # detectron2's model-zoo layout
        author, state, container = str(obj["__author__"]), obj["model"], "detectron2 pickle"
    elif "blobs" in obj:  # Caffe2 / Detectron1 detection file
        state = obj["blobs"]
    else:
        state = obj
        for wrapper in ("model", "state_dict", "model_state"):  # Swin release files: {"model": ...}
            if isinstance(obj.get(wrapper), dict):
                state, container = obj[wrapper], f"{container} ({wrapper!r} entry)"
                break
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path}: expected a dict of tensors, found a {type(state).__name__}")
    if any(_CAFFE2_KEY.fullmatch(str(key)) for key in state):
        raise BackboneWeightsError(
            f"{path}: MSRA/Caffe2 ResNet weights (detectron2's ImageNetPretrained/MSRA R-*.pkl: BGR input, pixel "
            f"std 1, stride in the 1x1 convolution), which Mask2Former does not use and this ResNet cannot "
            f"reproduce; use the torchvision R-50.pkl ({TORCHVISION_R50_URL}) or a torchvision/timm resnet50 file"
        )
    tensors = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            if not (value.flags.c_contiguous and value.flags.writeable):
                value = np.array(value, order="C")  # (np.ascontiguousarray would make 0-d counters 1-d)
            value = torch.from_numpy(value)
        if not isinstance(value, Tensor):
            raise BackboneWeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not an array")
        tensors[str(key)] = value
    if tensors and all(key.startswith("module.") for key in tensors):  # saved from DistributedDataParallel
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    return WeightsFile(path, tensors, container, author)


def describe_layout(state: dict[str, Tensor]) -> str:
    """A short guess of what the file holds, for error messages."""
    if any(key.startswith("backbone.") for key in state):
        return "a full segmentation-model checkpoint"
    if "patch_embed.proj.weight" in state:
        if "layers.0.downsample.reduction.weight" in state:
            return "Swin, official names"
        return "Swin, timm layout" if any(_SWIN_DOWNSAMPLE.match(key) for key in state) else "Swin"
    if any(_D2_RESNET_KEY.match(key) for key in state):
        return "ResNet, detectron2 names"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "ResNet, torchvision/timm names"
    return f"unknown layout (first key {next(iter(state), '<none>')!r})"


# ---------------------------------------------------------------------------------------------------------- mapping
def detectron2_resnet_to_torchvision(file: WeightsFile) -> dict[str, Tensor]:
    """Undo ``convert-torchvision-to-d2.py``; only its output (``__author__ == "torchvision"``) is accepted."""
    if file.author != "torchvision":
        raise BackboneWeightsError(
            f"{file.path}: detectron2 ResNet weights written by {file.author!r}; only torchvision-converted files "
            f"(__author__ 'torchvision': RGB input, torchvision mean/std, stride in the 3x3 convolution) match this "
            f"ResNet, e.g. {TORCHVISION_R50_URL}"
        )
    converted = {}
    for key, value in file.state.items():
        for pattern, template in _D2_TO_TORCHVISION:
            if pattern.fullmatch(key):
                name = pattern.sub(template, key)
                converted[_STAGE.sub(lambda m: f"layer{int(m.group(1)) - 1}", name)] = value
                break
        else:
            raise BackboneWeightsError(f"{file.path}: detectron2 ResNet weights: unexpected key {key!r} "
                                       f"(only the plain stem, res2-res5 and stem.fc are supported)")
    return converted


def swin_to_official(file: WeightsFile) -> tuple[dict[str, Tensor], list[str]]:
    """Official/timm Swin names -> ours (= official), dropping the derived buffers; returns (state, dropped keys)."""
    state = file.state
    timm_layout = "layers.0.downsample.reduction.weight" not in state and any(
        _SWIN_DOWNSAMPLE.match(key) for key in state)
    converted, dropped = {}, []
    for key, value in state.items():
        if _SWIN_INDEX.fullmatch(key):
            _check_position_index(file.path, key, value)
            dropped.append(key)
            continue
        if _SWIN_MASK.fullmatch(key):  # depends on the training resolution; recomputed per input
            dropped.append(key)
            continue
        if timm_layout:
            key = _SWIN_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
            key = key.replace("head.fc.", "head.", 1) if key.startswith("head.fc.") else key
        converted[key] = value
    return converted, dropped


def _check_position_index(path: Path, key: str, value: Tensor) -> None:
    window = int(round(value.shape[0] ** 0.5)) if value.ndim == 2 else 0
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :] + (window - 1)
    expected = relative[0] * (2 * window - 1) + relative[1]
    if window == 0 or value.shape != expected.shape or not torch.equal(value.long(), expected):
        raise BackboneWeightsError(f"{path}: {key} is not the standard Swin relative position index")


# ---------------------------------------------------------------------------------------------------------- loading
def load_backbone_weights(
    body: nn.Module, name: str, path: str | Path, *, swin: bool, head_keys: set[str] = frozenset(),
) -> str:
    """Load the ImageNet weights file ``path`` into ``body`` (our Swin, or a timm ``features_only`` CNN named
    ``name``). ``head_keys``: tensors of the full timm classifier that the feature extractor lacks (dropped when the
    file has them). Returns a one-line summary; raises :class:`BackboneWeightsError` with the model untouched."""
    file = read_weights_file(path)
    layout = describe_layout(file.state)
    if layout == "a full segmentation-model checkpoint":
        raise BackboneWeightsError(f"{file.path}: a full model checkpoint (backbone.* keys), not ImageNet backbone "
                                   f"weights; load it with Mask2Former.from_pretrained")
    dropped: list[str] = []
    if swin:
        if not layout.startswith("Swin"):
            raise BackboneWeightsError(f"{file.path}: backbone {name} needs Swin weights, the file holds {layout}")
        mapped, dropped = swin_to_official(file)
        ignorable = {key for key in mapped if key.startswith(("head.", "norm."))}
        optional = ("norms.",)
    else:
        if layout == "ResNet, detectron2 names":
            mapped = detectron2_resnet_to_torchvision(file)
        elif layout.startswith("Swin"):
            raise BackboneWeightsError(f"{file.path}: backbone {name} is a CNN, the file holds {layout} weights")
        else:
            mapped = file.state
        ignorable = set(head_keys)
        optional = ()
    summary = _check_and_load(body, name, file, layout, mapped, ignorable, optional, dropped)
    return summary


def _check_and_load(
    body: nn.Module, name: str, file: WeightsFile, layout: str, mapped: dict[str, Tensor], ignorable: set[str],
    optional: tuple[str, ...], dropped: list[str],
) -> str:
    where = f"{file.path} ({layout})"
    target = body.state_dict()
    kept: list[str] = []
    for key, tensor in target.items():
        if key not in mapped:
            if key.startswith(optional) or key.endswith(".num_batches_tracked"):
                kept.append(key)
                continue
            raise BackboneWeightsError(f"{where}: no tensor for {key} {tuple(tensor.shape)}, which backbone {name} "
                                       f"needs")
        if mapped[key].shape != tensor.shape:
            hint = ""
            if key.endswith("relative_position_bias_table"):
                hint = (f" (Swin window {_window(mapped[key].shape[0])} in the file, {_window(tensor.shape[0])} in "
                        f"the model: the 384-pixel Swin-B/L checkpoints need window_size 12, the 224 ones 7)")
            raise BackboneWeightsError(f"{where}: {key} has shape {tuple(mapped[key].shape)} in the file, backbone "
                                       f"{name} expects {tuple(tensor.shape)}{hint}")
    for key, tensor in mapped.items():
        if key not in target:
            if key in ignorable or key.endswith(".num_batches_tracked"):
                dropped.append(key)
                continue
            raise BackboneWeightsError(f"{where}: {key} {tuple(tensor.shape)} in the file has no place in backbone "
                                       f"{name}")
    state = {key: (mapped[key].to(tensor.dtype) if key in mapped else tensor) for key, tensor in target.items()}
    body.load_state_dict(state, strict=True)
    loaded = len(target) - len(kept)
    origin = f"{file.container}, __author__ {file.author!r}" if file.author else file.container
    summary = f"backbone {name}: loaded {loaded} tensors from {file.path} ({layout}; {origin})"
    if kept:
        summary += f"; not in the file, kept as initialised: {_some(kept)}"
    if dropped:
        summary += f"; unused from the file: {_some(dropped)}"
    return summary


def _window(table_rows: int) -> int:
    return (int(round(table_rows ** 0.5)) + 1) // 2


def _some(keys: list[str], shown: int = 6) -> str:
    """Keys grouped by their pattern with indices as N: ``layers.N.blocks.N.attn_mask (2)``."""
    groups: dict[str, int] = {}
    for key in keys:
        pattern = re.sub(r"(?<=\.)\d+(?=\.)", "N", key)
        groups[pattern] = groups.get(pattern, 0) + 1
    parts = [pattern if count == 1 else f"{pattern} ({count})" for pattern, count in groups.items()]
    return ", ".join(parts[:shown]) + (f", ... ({len(keys)} in all)" if len(parts) > shown else "")


def full_model_keys(name: str, kwargs: dict[str, Any]) -> set[str]:
    """State-dict keys of the full timm classifier ``name`` (built on the meta device: no memory, no init)."""
    import timm

    with torch.device("meta"):
        return set(timm.create_model(name, pretrained=False, **kwargs).state_dict())
