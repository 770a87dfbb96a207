"""Pixel decoders: turn backbone features into multi-scale memory for the transformer decoder and 1/4-resolution
``mask_features`` for the mask head.

- ``MSDeformAttnPixelDecoder`` (Mask2Former): 6 deformable encoder layers over res3-res5, one FPN level from res2.
- ``FPNPixelDecoder`` (MaskFormer): a plain top-down FPN over res5..res2.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn import MSDeformAttn
from .position_encoding import SinePositionEncoding


def conv_norm(in_channels: int, out_channels: int, kernel_size: int, norm: bool = True, bias: bool = False) -> nn.Sequential:
    """Conv (+ GroupNorm(32)) with detectron2's ``c2_xavier_fill`` initialisation (kaiming-uniform, a=1)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias or not norm)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [conv]
    if norm:
        layers.append(nn.GroupNorm(32, out_channels))
    return nn.Sequential(*layers)


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention, then FFN."""

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]) -> Tensor:
        src = self.norm1(src + self.dropout(self.self_attn(src + pos, reference_points, src, spatial_shapes)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], num_levels: int, device, dtype) -> Tensor:
    """Pixel centres of every level, normalised to [0, 1] as (x, y), the same for all levels: [1, S, L, 2]."""
    points = []
    for height, width in spatial_shapes:
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.flatten(), grid_y.flatten()], -1))
    reference = torch.cat(points, 0)[None, :, None, :].expand(1, -1, num_levels, 2)
    return reference.to(dtype)


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder on the three coarsest features plus one FPN level at 1/4."""

    def __init__(
        self,
        in_channels: list[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_encoder_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        fp32: bool = True,
    ) -> None:
        super().__init__()
        self.num_levels = 3
        # The reference runs this whole module with autocast off (``forward_features`` is ``@autocast(enabled=False)``
        # and casts its inputs with ``.float()``); ``fp32=False`` lets autocast lower its convs and linears.
        self.fp32 = fp32
        # Encoder inputs run from low to high resolution (res5, res4, res3), as the reference orders them.
        self.input_proj = nn.ModuleList()
        for channels in reversed(in_channels[1:]):
            proj = nn.Sequential(nn.Conv2d(channels, conv_dim, 1), nn.GroupNorm(32, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, conv_dim))  # normal_ below
        self.position_encoding = SinePositionEncoding(conv_dim // 2)
        # The reference deep-copies one layer (so the FFN biases start equal in every layer), then, over the encoder
        # and level_embed: xavier_uniform_ on every parameter with dim > 1, MSDeformAttn's own reset, normal_ on
        # level_embed. Net effect: FFN weights xavier, the rest as each module initialises itself.
        template = DeformableEncoderLayer(conv_dim, self.num_levels, num_heads, num_points, ffn_dim, dropout)
        self.encoder = nn.ModuleList(copy.deepcopy(template) for _ in range(num_encoder_layers))
        for param in self.encoder.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.encoder.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)
        self.lateral_conv = conv_norm(in_channels[0], conv_dim, 1)
        self.output_conv = conv_norm(conv_dim, conv_dim, 3)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward_encoder(self, features: list[Tensor]) -> list[Tensor]:
        """features: [res3, res4, res5] -> encoded maps [1/32, 1/16, 1/8]."""
        sources, positions, spatial_shapes = [], [], []
        for level, (proj, feature) in enumerate(zip(self.input_proj, reversed(features))):
            source = proj(feature)
            spatial_shapes.append((source.shape[2], source.shape[3]))
            pos = self.position_encoding(source).flatten(2).transpose(1, 2) + self.level_embed[level].to(source.dtype)
            sources.append(source.flatten(2).transpose(1, 2))
            positions.append(pos)
        src = torch.cat(sources, 1)
        pos = torch.cat(positions, 1)
        reference_points = encoder_reference_points(spatial_shapes, self.num_levels, src.device, src.dtype)
        reference_points = reference_points.expand(src.shape[0], -1, -1, -1)
        for layer in self.encoder:
            src = layer(src, pos, reference_points, spatial_shapes)
        batch, _, channels = src.shape
        outputs = src.split([h * w for h, w in spatial_shapes], dim=1)
        return [out.transpose(1, 2).reshape(batch, channels, h, w) for out, (h, w) in zip(outputs, spatial_shapes)]

    def forward(self, features: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """features: [res2, res3, res4, res5] -> (mask_features at 1/4, multi-scale maps [1/32, 1/16, 1/8]).
        With ``fp32`` (the reference) everything here runs in float32 with autocast off, outputs included."""
        if not self.fp32:
            return self._forward(features)
        with torch.autocast(device_type=features[0].device.type, enabled=False):
            return self._forward([feature.float() for feature in features])

    def _forward(self, features: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        multi_scale = self.forward_encoder(features[1:])
        lateral = self.lateral_conv(features[0])
        # Bilinear (the reference's comment says nearest, its code is bilinear).
        top_down = F.interpolate(multi_scale[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        fpn = F.relu(self.output_conv(lateral + top_down))
        return self.mask_features(fpn), multi_scale


class FPNPixelDecoder(nn.Module):
    """MaskFormer's BasePixelDecoder: top-down FPN with nearest upsampling, 3x3 ``mask_features`` at 1/4.

    Returns the same pair as the deformable decoder; the memory list is ``[res5]`` because MaskFormer's decoder
    attends to the raw res5 feature (projected inside the decoder when its width differs).
    """

    def __init__(self, in_channels: list[int], conv_dim: int = 256, mask_dim: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(conv_norm(c, conv_dim, 1) for c in in_channels[:-1])
        self.output_convs = nn.ModuleList(conv_norm(conv_dim, conv_dim, 3) for _ in in_channels[:-1])
        self.top_conv = conv_norm(in_channels[-1], conv_dim, 3)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        y = F.relu(self.top_conv(features[-1]))
        for index in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[index](features[index])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = F.relu(self.output_convs[index](y))
        return self.mask_features(y), [features[-1]]
