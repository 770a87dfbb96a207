"""Multi-scale deformable attention (Deformable DETR).

The reference sampling core is plain ``grid_sample`` so it runs on any device; ``ms_deform_attn_core`` picks a
compiled kernel at run time when one can be had (C on the CPU, Triton on CUDA; see ``kernels/``), each checked
against this path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import select_ms_deform_attn


def ms_deform_attn_core(
    value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The MSDeformAttn sampling core (contract of ``ms_deform_attn_core_pytorch``), dispatched per call to the
    C (CPU) or Triton (CUDA) kernel or the PyTorch path (``kernels.select_ms_deform_attn``; ``MASK2FORMER_MSDA_BACKEND``
    forces one)."""
    implementation = select_ms_deform_attn(value, ms_deform_attn_core_pytorch)
    return implementation(value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_attn_core_pytorch(
    value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Bilinearly sample every level of ``value`` and sum the samples with ``attention_weights``.

    value: [B, S, heads, D] with S = sum(h*w); sampling_locations: [B, Lq, heads, L, P, 2] in [0, 1] (x, y);
    attention_weights: [B, Lq, heads, L, P]. Returns [B, Lq, heads*D].
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    # Point-major [B*heads, L, 1, P*Lq, 2] grids: grid_sample vectorises over the long last axis (a [Lq, P] grid
    # leaves it only P wide), and the weighted sum over points then runs over contiguous [Lq] rows, level by level,
    # without stacking all samples.
    grids = sampling_locations.permute(0, 2, 3, 4, 1, 5).reshape(batch * heads, num_levels, 1, num_points * num_queries, 2)
    grids = 2 * grids - 1
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(batch * heads, num_levels, 1, num_points, num_queries)
    output = None
    for level, (height, width) in enumerate(spatial_shapes):
        # [B, h*w, heads, D] -> [B*heads, D, h, w]
        value_l = value_list[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width).to(grids.dtype)
        sampled = F.grid_sample(value_l, grids[:, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        contribution = (sampled.view(batch * heads, head_dim, num_points, num_queries) * weights[:, level]).sum(2)
        output = contribution if output is None else output + contribution
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2)


def level_sizes_wh(spatial_shapes: list[tuple[int, int]], dtype: torch.dtype, device) -> Tensor:
    """[L, 2] (width, height) of every level. Under tracing the sizes are 0-dim tensors read from the input's
    shape: stacking them keeps them in the graph (``torch.tensor`` would freeze the export size into it)."""
    if torch.jit.is_tracing():
        return torch.stack([torch.stack([torch.as_tensor(w), torch.as_tensor(h)]) for h, w in spatial_shapes]).to(
            dtype=dtype, device=device)
    return torch.tensor([[w, h] for h, w in spatial_shapes], dtype=dtype, device=device)


class MSDeformAttn(nn.Module):
    """Each query attends to ``num_points`` learned offsets around its reference point on every level."""

    def __init__(self, embed_dim: int = 256, num_levels: int = 3, num_heads: int = 8, num_points: int = 4) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as rings of points in 8 (num_heads) directions, one ring per point index;
        # attention starts uniform. This is Deformable DETR's initialisation.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """query: [B, Lq, C]; reference_points: [B, Lq, L, 2] normalised (x, y); value: [B, S, C]."""
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).view(batch, value.shape[1], heads, self.embed_dim // heads)
        # Where to sample and with what weight is computed in the parameters' precision even under autocast: a bf16
        # location is off by up to a quarter pixel at 1/8 scale (the reference keeps this whole module in fp32).
        with torch.autocast(query.device.type, enabled=False):
            query = query.to(self.sampling_offsets.weight.dtype)
            # Offsets are in pixels of each level: dividing the layer's weight and bias by that level's (width,
            # height) normalises them without a pass over the [B, Lq, heads, L, P, 2] offsets.
            normalizer = level_sizes_wh(spatial_shapes, query.dtype, query.device)
            scale = normalizer.view(1, levels, 1, 2).expand(heads, levels, points, 2).reshape(-1)
            offsets = F.linear(query, self.sampling_offsets.weight / scale[:, None], self.sampling_offsets.bias / scale)
            offsets = offsets.view(batch, num_queries, heads, levels, points, 2)
            weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
            # The same softmax over the 12-ish levels*points, taken along a transposed view: PyTorch's CPU softmax
            # over a short last dim is ~3x slower (forward + backward) than over a strided one.
            weights = weights.transpose(-1, -2).softmax(-2).transpose(-1, -2)
            weights = weights.view(batch, num_queries, heads, levels, points)
            locations = reference_points.to(query.dtype)[:, :, None, :, None, :] + offsets
        output = ms_deform_attn_core(value, spatial_shapes, locations, weights)
        return self.output_proj(output)
