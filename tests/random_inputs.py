"""Random inputs for comparing implementations (tests and benchmarks): non-degenerate weights and random targets.

transformers' initialisation (std 0.02, zero relative-bias tables, zero deformable offsets) gives near-constant
outputs, which would hide a swapped norm or projection in a parity check. These helpers give every parameter a
unit-scale value so that every path changes the numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def random_targets(num_per_image, num_classes, size=64, seed=0, device="cpu"):
    """Criterion/matcher targets: per image ``count`` random rectangles of ``size`` x ``size`` with random classes."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count in num_per_image:
        masks = torch.zeros(count, size, size, dtype=torch.bool)
        for i in range(count):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            height, width = torch.randint(size // 8, size // 2, (2,), generator=generator).tolist()
            masks[i, top : top + height, left : left + width] = True
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return targets


@torch.no_grad()
def randomise_unit_scale(model: nn.Module, seed: int, spread: float = 0.2, buffers: bool = False) -> nn.Module:
    """Matrices ~ N(0, 1/fan_in); norm weights 1 + spread*N; other vectors spread*N; relative-position tables, level
    embeddings and query embeddings N(0, 1). ``buffers``: also BatchNorm running statistics."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
        elif "norm" in name and name.endswith("weight"):
            param.copy_(1 + spread * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(spread * torch.randn(param.shape, generator=generator))
        if any(key in name for key in ("relative_position_bias_table", "level_embed", "queries_")):
            param.copy_(torch.randn(param.shape, generator=generator))
    if buffers:
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(spread * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    return model


@torch.no_grad()
def informative_transformers_mask2former(model: nn.Module, seed: int, image_size: int = 256) -> nn.Module:
    """Unit-scale weights for a transformers ``Mask2FormerForUniversalSegmentation``, mask logits of a few units,
    and mask features centred so that predicted masks cover about half the image: the masked attention then really
    blocks (rather than every query seeing an all-blocked row, which falls back to full attention)."""
    randomise_unit_scale(model, seed)
    for name, param in model.named_parameters():
        if "mask_embedder.2" in name:
            param.mul_(10.0)
    projection = model.model.pixel_level_module.decoder.mask_projection
    stats = {}
    hook = projection.register_forward_hook(lambda module, args, out: stats.update(mean=out.mean((0, 2, 3))))
    generator = torch.Generator().manual_seed(seed + 1)
    model(pixel_values=torch.randn(1, 3, image_size, image_size, generator=generator))
    hook.remove()
    projection.bias.sub_(stats["mean"])
    return model


def trained_like(model: nn.Module) -> nn.Module:
    """Random init leaves the mask logits near zero (their sign is noise); scaled-up transformer-decoder weights give
    masks with structure, as a trained model has, so that agreement of signs between runtimes or precisions means
    something. Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 and "transformer_decoder" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * (1.5 / parameter.shape[-1] ** 0.5))
    return model.eval()
