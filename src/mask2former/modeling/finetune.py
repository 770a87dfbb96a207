"""``model.weights``: the model a fine-tuning run starts from, built from a whole trained checkpoint.

The rule for the architecture: it is the checkpoint's model config, with
- ``num_classes`` from the data set (the class head follows the class names: ``interop/class_head.py``);
- ``mask_piloting`` and ``semantic_postprocess_before_inference`` as ``build_model`` sets them from the config
  (training options, not weights: MP-Former's label embedding is built fresh when the checkpoint has none);
- the config's values of :data:`TRAINING_FIELDS` (regularisation and numerics: no tensor depends on them);
- every ``model.*`` key the user set explicitly (the command line's ``model.X=...`` overrides): those win, and
  must still fit the checkpoint's tensors.
Any other ``model.*`` value of the config that differs from the checkpoint's is not used, and the log says so.

Loading: every tensor is loaded whose name and shape fit; the class rows follow the class names; a tensor the
checkpoint lacks or the model lacks is an error except :data:`OPTIONAL_SUFFIXES` (batch-norm counters, MP-Former's
label embedding), which keep the new initialisation and are listed in the log. Any other shape mismatch is a
one-line error naming the key and both shapes, and nothing is loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from torch import Tensor, nn

from ..config import ModelConfig, from_dict, to_dict
from ..interop.checkpoint import read_checkpoint
from ..interop.class_head import CLASS_BIAS, CLASS_ROW_KEYS, LABEL_EMBED, match_classes, transfer_class_rows
from ..interop.errors import CheckpointError
from .backbone import skip_imagenet_weights
from .model import Mask2Former

# Model-config fields taken from the training config: they shape no tensor.
TRAINING_FIELDS = ("dropout", "enc_dropout", "pixel_decoder_fp32", "backbone.freeze_at", "backbone.drop_path_rate")
# Tensors that may be absent on either side (they keep the new initialisation, logged).
OPTIONAL_SUFFIXES = (".num_batches_tracked", LABEL_EMBED)
# Fields whose difference from the checkpoint is not worth a log line (bookkeeping, set by the caller).
_NOT_ARCHITECTURE = {"num_classes", "weights", "mask_piloting", "semantic_postprocess_before_inference",
                     "backbone.pretrained", "backbone.weights"}


def _flat(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict) and key != "kwargs":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set(document: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        document = document.setdefault(part, {})
    document[last] = value


def finetune_model_config(checkpoint: ModelConfig, config: ModelConfig, explicit: Iterable[str] = ()
                          ) -> tuple[ModelConfig, list[str]]:
    """The architecture of a ``model.weights`` run (the module doc's rule, without the class count and the
    training options the caller sets) and the log lines about config values that were not used or overrode."""
    merged, wanted = to_dict(checkpoint), to_dict(config)
    flat_checkpoint, flat_wanted = _flat(merged), _flat(wanted)
    explicit_keys = {key.removeprefix("model.") for key in explicit} - _NOT_ARCHITECTURE
    notes = []
    for key in (*TRAINING_FIELDS, *sorted(explicit_keys)):
        matching = [name for name in flat_wanted if name == key or name.startswith(key + ".")]
        for name in matching:
            if flat_checkpoint.get(name) != flat_wanted[name]:
                _set(merged, name, flat_wanted[name])
                if key in explicit_keys:
                    notes.append(f"model.{name}: {flat_wanted[name]!r} (set explicitly; the checkpoint has "
                                 f"{flat_checkpoint.get(name)!r})")
    taken = set(TRAINING_FIELDS) | explicit_keys
    unused = [f"model.{name}={flat_wanted[name]!r} (checkpoint: {flat_checkpoint.get(name)!r})"
              for name in flat_wanted
              if name not in _NOT_ARCHITECTURE and not any(name == k or name.startswith(k + ".") for k in taken)
              and flat_checkpoint.get(name) != flat_wanted[name]]
    if unused:
        notes.append("the architecture comes from model.weights; config values not used: " + ", ".join(unused))
    merged["weights"] = config.weights
    return from_dict(ModelConfig, merged, "model"), notes


def load_by_class_names(model: nn.Module, state: dict[str, Tensor], labels: dict[str, Any] | None,
                        source: str) -> str:
    """Load ``state`` into ``model`` as the module doc says; returns the report (several lines). Raises
    :class:`CheckpointError` before touching the model when something does not fit."""
    own = model.state_dict()
    new_names = (model.labels or {}).get("names") or [str(i) for i in range(model.num_classes)]
    old_count = int(state[CLASS_BIAS].shape[0]) - 1 if CLASS_BIAS in state else len(new_names)
    old_names = labels.get("names") if labels else None
    try:
        match = match_classes(old_names, new_names, old_count)
        class_rows = transfer_class_rows(state, own, match)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None
    loaded: dict[str, Tensor] = {}
    unused, fresh = [], []
    for key, value in state.items():
        if key in CLASS_ROW_KEYS and key in class_rows:
            continue
        if key not in own:
            if key.endswith(OPTIONAL_SUFFIXES):
                unused.append(key)
                continue
            raise CheckpointError(f"{source}: tensor {key} {tuple(value.shape)} is not part of the model "
                                  f"(model.* settings that change the architecture do not fit this checkpoint)")
        if own[key].shape != value.shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(value.shape)} in the checkpoint but the "
                                  f"model expects {tuple(own[key].shape)}")
        loaded[key] = value
    for key in own:
        if key not in loaded and key not in class_rows:
            if not key.endswith(OPTIONAL_SUFFIXES):
                raise CheckpointError(f"{source}: the checkpoint has no tensor {key} {tuple(own[key].shape)}")
            fresh.append(key)
    model.load_state_dict({**loaded, **class_rows}, strict=False)
    lines = [f"model.weights: {len(loaded) + len(class_rows)} of {len(own)} tensors loaded from {source}",
             match.summary()]
    if fresh:
        lines.append(f"model.weights: not in the checkpoint, initialised fresh: {', '.join(fresh)}")
    if unused:
        lines.append(f"model.weights: in the checkpoint but not in this model, not used: {', '.join(unused)}")
    return "\n".join(lines)


def model_from_weights(model_config: ModelConfig, labels: dict[str, Any], explicit: Iterable[str] = ()
                       ) -> tuple[Mask2Former, str]:
    """``(model, report)``: the checkpoint ``model_config.weights`` names, on the label space ``labels``
    (``LabelSpace.to_dict()``). ``model_config`` is the run's (class count, piloting and test flags already set)."""
    checkpoint_config, state, checkpoint_labels, source = read_checkpoint(model_config.weights)
    architecture, notes = finetune_model_config(checkpoint_config, model_config, explicit)
    architecture = dataclasses.replace(
        architecture, num_classes=len(labels["names"]), mask_piloting=model_config.mask_piloting,
        semantic_postprocess_before_inference=model_config.semantic_postprocess_before_inference)
    with skip_imagenet_weights():  # the checkpoint replaces the ImageNet weights: no file needed
        model = Mask2Former(architecture, labels=labels)
    report = load_by_class_names(model, state, checkpoint_labels, source)
    return model, "\n".join([*notes, report])


__all__ = ["OPTIONAL_SUFFIXES", "TRAINING_FIELDS", "finetune_model_config", "load_by_class_names",
           "model_from_weights"]
