"""Our checkpoint format (``config.yaml`` + ``model.safetensors``), the dispatch to the foreign formats' readers,
and the checked load of a state dict into a model (``modeling/pretrained.py`` builds the model)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import ModelConfig, from_dict, to_dict
from .errors import CheckpointError

# Tensors whose size depends on the class count (MP-Former adds a label embedding).
CLASS_HEAD_KEYS = (
    "transformer_decoder.heads.class_embed.weight",
    "transformer_decoder.heads.class_embed.bias",
    "transformer_decoder.label_embed.weight",
)


def save_pretrained(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    document = {"model": to_dict(model.config), "labels": model.labels}
    if extra:
        document.update(extra)
    (path / "config.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt", "library": "mask2former"})


def read_checkpoint(path: str | Path, config: str | None = None
                    ) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any] | None, str]:
    """``(model config, state dict in our names, labels, description)`` of our directory (``config.yaml`` +
    ``model.safetensors``), a transformers directory (``config.json``) or a detectron2 ``.pkl``/``.pth``
    (``config``: the preset it was trained with), or a name ``interop/hub.py`` resolves (a Hugging Face Hub id, a
    model-zoo name: its preset is then ``config`` unless given)."""
    from .hub import resolve_checkpoint, zoo_preset

    config = config or zoo_preset(path)
    path = resolve_checkpoint(path)
    if path.is_dir() and (path / "config.yaml").exists():
        document = yaml.safe_load((path / "config.yaml").read_text()) or {}
        model_config = from_dict(ModelConfig, document.get("model", {}), "model")
        state = load_file(str(path / _weights_file(path)))
        return model_config, state, document.get("labels"), str(path)
    if path.is_dir() and (path / "config.json").exists():
        from .hf import convert_hf_checkpoint

        return (*convert_hf_checkpoint(path), f"transformers checkpoint {path}")
    if path.suffix == ".pkl" or path.suffix == ".pth":
        from .detectron2 import convert_detectron2_checkpoint

        return (*convert_detectron2_checkpoint(path, config), f"detectron2 checkpoint {path}")
    raise CheckpointError(
        f"{path}: not a checkpoint (expected a directory with config.yaml or config.json, or a detectron2 .pkl)"
    )


def _weights_file(path: Path) -> str:
    if (path / "model.safetensors").exists():
        return "model.safetensors"
    raise CheckpointError(f"{path}: model.safetensors is missing")


def load_state_dict_checked(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` strictly, except that a class head of another size is skipped with a warning."""
    own = model.state_dict()
    state = dict(state)
    skipped = []
    bias_key = CLASS_HEAD_KEYS[1]
    if bias_key in state and bias_key in own and state[bias_key].shape != own[bias_key].shape:
        found = state[bias_key].shape[0] - 1
        for key in CLASS_HEAD_KEYS:
            state.pop(key, None)
            skipped.append(key)
        warnings.warn(
            f"{source}: the checkpoint has {found} classes, the model {own[bias_key].shape[0] - 1}: loaded everything "
            "except the class head, which keeps its random initialisation",
            stacklevel=3,
        )
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}"
            )
    missing = sorted(set(own) - set(state) - set(skipped))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise CheckpointError(f"{source}: does not fit the model: " + ", ".join(parts))
    model.load_state_dict(state, strict=False)
