"""Fold each frozen batch norm into the convolution before it, at run time.

A frozen batch norm is a fixed per-channel affine map ``x * scale + shift``. Applied by the convolution instead
(weight ``w * scale``, bias ``shift``), it costs a pass over the weight rather than two over the activation, forward
and backward: in EfficientNet-Lite0 48 such maps touched every activation of the backbone (~5 % of the default
training step on a 2-core CPU). The convolution's weight keeps training; the norm's statistics stay buffers.
Parameter and buffer names do not change, so checkpoints are the same with and without folding. Numerically the
product is rounded once in another order (fp32: relative differences ~1e-7).
"""

from __future__ import annotations

from timm.layers import FrozenBatchNormAct2d
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

FROZEN_NORMS = (FrozenBatchNormAct2d, FrozenBatchNorm2d)


def frozen_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) of a frozen batch norm, both [C]."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


class NormFoldedConv2d(nn.Conv2d):
    """A convolution (``nn.Conv2d`` or timm's TF-"same" ``Conv2dSame``) that applies the frozen norm after it."""

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = frozen_affine(self.folded_norm)
        weight = self.weight * scale.view(-1, 1, 1, 1).to(self.weight.dtype)
        bias = shift if self.bias is None else self.bias * scale + shift
        if self.same_padding:
            x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return self._conv_forward(x, weight, bias.to(weight.dtype))


class FoldedNormAct(nn.Module):
    """What is left of a folded norm: its activation (FrozenBatchNormAct2d) or nothing (FrozenBatchNorm2d)."""

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self, FrozenBatchNormAct2d):
            return self.act(self.drop(x))
        return x


def _folded_class(base: type) -> type:
    return type(f"Folded{base.__name__}", (FoldedNormAct, base), {})


_FOLDED = {base: _folded_class(base) for base in FROZEN_NORMS}


def fold_frozen_norms(module: nn.Module) -> int:
    """Fold every frozen norm that directly follows a bias-free convolution among its siblings (timm's
    ``conv_pw, bn1, conv_dw, bn2, ...`` order); returns how many were folded."""
    folded = 0
    for parent in module.modules():
        children = list(parent.children())
        for conv, norm in zip(children, children[1:]):
            if (type(conv) in (nn.Conv2d, Conv2dSame) and conv.bias is None and type(norm) in _FOLDED
                    and norm.num_features == conv.out_channels):
                same_padding = isinstance(conv, Conv2dSame)
                conv.__class__ = NormFoldedConv2d
                conv.same_padding = same_padding
                object.__setattr__(conv, "folded_norm", norm)  # a reference, not a submodule: no new state keys
                norm.__class__ = _FOLDED[type(norm)]
                folded += 1
    return folded
