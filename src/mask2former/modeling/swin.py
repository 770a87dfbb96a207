"""Swin Transformer backbone that accepts any input size, as the Mask2Former (detectron2) Swin does.

timm's Swin rolls before padding and fixes window sizes at construction, which changes the numbers for inputs
that are not window multiples; the reference pads each block's input to a window multiple *before* the cyclic
shift. This module follows the reference and keeps the official Swin parameter names (``patch_embed``,
``layers.i.blocks.j``, ``attn.qkv``, ``mlp.fc1``..., patch merging at the end of stage i as ``layers.i.downsample``;
timm uses the same names but merges at the start of stage i+1), so the official ImageNet ``.pth`` loads by name
(interop/backbone_weights.py). Stage outputs get their own LayerNorm (``norms.i``, the reference's ``norm{i}``) and
are returned NCHW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn


def _window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of window) -> [B * nW, window*window, C]."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def _window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def relative_position_bias(self, window: int) -> Tensor:
        """[heads, window^2, window^2]; ``window`` may be smaller than the table's window (central entries)."""
        coords = torch.stack(
            torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ).flatten(1)  # [2, window^2]
        relative = coords[:, :, None] - coords[:, None, :] + (self.window_size - 1)
        index = relative[0] * (2 * self.window_size - 1) + relative[1]
        bias = self.relative_position_bias_table[index.to(self.relative_position_bias_table.device)]
        return bias.permute(2, 0, 1)

    def forward(self, x: Tensor, window: int, mask: Tensor | None) -> Tensor:
        """x: [B*nW, N, C]; mask: [nW, N, N] additive, or None."""
        batch_windows, tokens, channels = x.shape
        qkv = self.qkv(x).view(batch_windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attn_bias = self.relative_position_bias(window).to(x.dtype).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn_bias = attn_bias.view(1, 1, self.num_heads, tokens, tokens) + mask.view(1, num_windows, 1, tokens, tokens)
            attn_bias = attn_bias.expand(batch_windows // num_windows, -1, -1, -1, -1).reshape(
                batch_windows, self.num_heads, tokens, tokens
            )
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch_windows, tokens, channels))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, window_size: int, shifted: bool, mlp_ratio: float, drop_path: float,
        adaptive_window: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.adaptive_window = adaptive_window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, H, W, C]."""
        _, height, width, _ = x.shape
        window, shift = self.window_size, (self.window_size // 2 if self.shifted else 0)
        if self.adaptive_window and min(height, width) <= window:
            # Classification Swin / transformers: a map no larger than a window is one unshifted window.
            window, shift = min(height, width), 0
        shortcut = x
        x = self.norm1(x)
        pad_bottom, pad_right = (-height) % window, (-width) % window
        x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_h, padded_w = height + pad_bottom, width + pad_right
        mask = None
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = _shift_attention_mask(padded_h, padded_w, window, shift, x.dtype, x.device)
        windows = self.attn(_window_partition(x, window), window, mask)
        x = _window_reverse(windows, window, padded_h, padded_w)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :height, :width, :]
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _shift_attention_mask(height: int, width: int, window: int, shift: int, dtype, device) -> Tensor:
    """Blocks attention between pixels that the cyclic shift brought together from different image regions."""

    def regions(size: int) -> Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - window).long() + (index >= size - shift).long()

    region = (regions(height)[:, None] * 3 + regions(width)[None, :]).to(dtype)
    region_windows = _window_partition(region[None, :, :, None], window).squeeze(-1)  # [nW, window^2]
    different = region_windows[:, None, :] != region_windows[:, :, None]
    return different.to(dtype) * -100.0


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token with twice the channels (pads odd sizes)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _, height, width, _ = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Channel order (top-left, bottom-left, top-right, bottom-right) is the reference's.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch_size: int = 4, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        x = F.pad(x, (0, (-width) % self.patch_size, 0, (-height) % self.patch_size))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    def __init__(
        self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, drop_paths: list[float],
        downsample: bool, adaptive_window: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, i % 2 == 1, mlp_ratio, drop_paths[i], adaptive_window)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None


class SwinTransformer(nn.Module):
    """Swin backbone returning the four stage outputs (strides 4, 8, 16, 32), each layer-normed, as NCHW."""

    def __init__(
        self,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        adaptive_window: bool = False,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim)
        total = sum(depths)
        # Linearly increasing stochastic depth, computed in Python so the module can be built on the meta device.
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(dims[i], depth, num_heads[i], window_size, mlp_ratio, rates[start : start + depth],
                          downsample=i < len(depths) - 1, adaptive_window=adaptive_window)
            )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for dim in dims)
        self.out_channels = dims
        self.out_strides = [4 * 2**i for i in range(len(depths))]
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.patch_embed(images)
        features = []
        for stage, norm in zip(self.layers, self.norms):
            for block in stage.blocks:
                x = block(x)
            # Under bf16/fp16 the NCHW-shaped output stays channels-last in memory (a view): the pixel decoder's
            # convolutions take it as it is and flattening back to tokens is a view too. fp32 keeps the NCHW copy:
            # a channels-last convolution sums in another order (~1e-4 apart from transformers' outputs).
            feature = norm(x).permute(0, 3, 1, 2)
            features.append(feature if feature.dtype in (torch.bfloat16, torch.float16) else feature.contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        return features


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
