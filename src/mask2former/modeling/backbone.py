"""Backbones: four feature maps at strides 4, 8, 16, 32 (res2..res5).

CNNs come from timm with ``features_only=True``; Swin is our own module (see ``swin.py`` for why).
"""

from __future__ import annotations

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn

from ..config import BackboneConfig
from .swin import SWIN_SPECS, SwinTransformer


class Backbone(nn.Module):
    """Wraps a feature extractor as ``forward(images) -> [res2, res3, res4, res5]`` (NCHW)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        name = config.name
        if name.startswith("swin"):
            variant = "_".join(name.split("_")[:2])
            if variant not in SWIN_SPECS:
                raise ValueError(f"unknown Swin variant {name!r}; choose one of {sorted(SWIN_SPECS)}")
            if config.pretrained:
                raise ValueError(f"no offline ImageNet weights for {name!r}: load a checkpoint with from_pretrained instead")
            spec = SWIN_SPECS[variant]
            kwargs = dict(embed_dim=spec.embed_dim, depths=spec.depths, num_heads=spec.num_heads,
                          window_size=spec.window_size, drop_path_rate=config.drop_path_rate)
            kwargs.update(config.kwargs)
            self.body = SwinTransformer(**kwargs)
            self.out_channels = list(self.body.out_channels)
        else:
            # Read the feature strides from a meta-device build, then build only the four levels we use.
            with torch.device("meta"):
                reductions = timm.create_model(name, features_only=True, **config.kwargs).feature_info.reduction()
            indices = [reductions.index(stride) for stride in (4, 8, 16, 32) if stride in reductions]
            if len(indices) != 4:
                raise ValueError(f"timm model {name!r} does not provide features at strides 4/8/16/32: {reductions}")
            self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices, **config.kwargs)
            self.out_channels = list(self.body.feature_info.channels())
            if config.pretrained:
                from ..interop.efficientnet_lite import load_imagenet_weights

                load_imagenet_weights(self.body, name)
            if config.freeze_bn:
                self.body = freeze_batch_norm_2d(self.body)

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.body(images))
