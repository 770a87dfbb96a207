"""bf16 inference on the CPU without per-call weight casts.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` every ``linear`` and ``conv2d`` casts its fp32 weight (and
bias) to bf16 on each call: for Swin-T Mask2Former that is ~47 M parameters read, converted and written per forward,
plus oneDNN re-packing each converted conv weight. ``cast_weights_for_bf16_autocast`` does that cast once. The
values are the ones autocast would have made (the same round-to-nearest-even), so bf16 outputs do not change; only
fp32 inference is no longer possible with the cast model (use a copy, as ``Predictor`` does).
"""

from __future__ import annotations

import torch
from torch import nn

from .ms_deform_attn import MSDeformAttn
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import Attention

__all__ = ["cast_weights_for_bf16_autocast"]


def _fp32_islands(model: nn.Module) -> set[int]:
    """ids of the modules that run with autocast off and must keep fp32 weights."""
    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            # Sampling offsets and attention weights are computed in the parameters' precision (see its forward).
            keep.update({id(module.sampling_offsets), id(module.attention_weights)})
        if isinstance(module, MSDeformAttnPixelDecoder) and module.fp32:
            keep.update(id(sub) for sub in module.modules())
    return keep


@torch.no_grad()
def cast_weights_for_bf16_autocast(model: nn.Module) -> nn.Module:
    """Cast in place, to bf16, the weights and biases of the ``nn.Linear`` / ``nn.Conv2d`` layers (and the decoder's
    packed attention projections) that run under bf16 autocast; layers where the model turns autocast off keep fp32
    (``MSDeformAttn``'s sampling offsets and attention weights; the whole pixel decoder while its ``fp32`` is set).
    Norms, embeddings and buffers keep fp32, as autocast leaves them. Returns ``model``, now for bf16-autocast
    inference only (set ``pixel_decoder.fp32`` before calling: the choice is baked in)."""
    keep = _fp32_islands(model)
    for module in model.modules():
        if id(module) in keep:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(torch.bfloat16)
        elif isinstance(module, Attention):
            for parameter in (module.in_proj_weight, module.in_proj_bias):
                parameter.data = parameter.data.to(torch.bfloat16)
    return model
