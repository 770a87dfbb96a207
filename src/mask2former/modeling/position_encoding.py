"""DETR-style 2-D sine positional encoding, normalised to [0, 2*pi] over the feature map."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinePositionEncoding(nn.Module):
    """Encodes (y, x) of every pixel of a feature map as interleaved sin/cos features.

    Output channels are ``2 * num_pos_feats``: the y encoding first, then x (the reference layout). Padding is
    not masked (the reference passes no mask), so the encoding only depends on the map's height and width.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        """``x``: any tensor shaped [B, C, H, W]; returns [B, 2*num_pos_feats, H, W] in ``x``'s dtype."""
        batch, _, height, width = x.shape
        eps = 1e-6
        # Positions are computed in fp32 so that bf16/fp16 inputs do not quantise large coordinates.
        y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=x.device) / (height + eps) * self.scale
        x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=x.device) / (width + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = _interleave_sin_cos(x_embed[:, None] / dim_t)  # [W, F]
        pos_y = _interleave_sin_cos(y_embed[:, None] / dim_t)  # [H, F]
        pos = torch.cat(
            (pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)), dim=-1
        )
        return pos.permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1).to(x.dtype)


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)
