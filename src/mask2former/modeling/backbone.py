"""Backbones: four feature maps at strides 4, 8, 16, 32 (res2..res5).

CNNs come from timm with ``features_only=True``; Swin is our own module (see ``swin.py`` for why).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Iterator

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn

from ..config import SWIN_SPECS, BackboneConfig
from .frozen_norm_fold import fold_frozen_norms
from .swin import SwinTransformer

logger = logging.getLogger("mask2former.backbone")


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
            spec = SWIN_SPECS[variant]
            kwargs = dict(embed_dim=spec.embed_dim, depths=spec.depths, num_heads=spec.num_heads,
                          window_size=spec.window_size, drop_path_rate=config.drop_path_rate)
            kwargs.update(config.kwargs)
            self.body = SwinTransformer(**kwargs)
            self.out_channels = list(self.body.out_channels)
            level_modules = [f"layers.{index}" for index in range(4)]
            self.weights_report = self._load_imagenet_weights(config, swin=True)
        else:
            # Read the feature strides from a meta-device build, then build only the four levels we use.
            with torch.device("meta"):
                reductions = timm.create_model(name, features_only=True, **config.kwargs).feature_info.reduction()
            indices = [reductions.index(stride) for stride in (4, 8, 16, 32) if stride in reductions]
            if len(indices) != 4:
                raise ValueError(f"timm model {name!r} does not provide features at strides 4/8/16/32: {reductions}")
            self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices, **config.kwargs)
            self.out_channels = list(self.body.feature_info.channels())
            level_modules = list(self.body.feature_info.module_name())
            self.weights_report = self._load_imagenet_weights(config, swin=False)
            if config.freeze_bn:
                self.body = freeze_batch_norm_2d(self.body)
                fold_frozen_norms(self.body)
        # Bodies with depthwise/grouped convolutions (EfficientNet, MobileNet) run channels-last (NHWC): oneDNN's
        # depthwise convolutions are 2-3x faster there, backward above all (EfficientNet-Lite0's default training
        # step: -15 % on an AVX2 CPU). Dense ResNets are not: ResNet-50 forward + backward is 9 % slower in NHWC.
        self.channels_last = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in self.body.modules())
        if self.channels_last:
            self.body.to(memory_format=torch.channels_last)
        freeze_stages(self.body, level_modules, config.freeze_at)

    def _load_imagenet_weights(self, config: BackboneConfig, swin: bool) -> str:
        """Initialise ``self.body`` from ImageNet weights as ``config`` says; returns a one-line account."""
        name = config.name
        if not config.pretrained:
            return f"backbone {name}: random initialisation (pretrained=false)"
        if not _LOAD_WEIGHTS.get():
            return f"backbone {name}: ImageNet weights skipped (a checkpoint replaces them)"
        if config.weights:
            from ..interop.backbone_weights import full_model_keys, load_backbone_weights, missing_weights_message
            from ..interop.backbone_weights import resolve_weights

            path = resolve_weights(config.weights)
            if path is None:
                # Building for inference does not need the file; training checks for it first (train.run_train).
                logger.warning("%s: the backbone stays random (fine when a trained checkpoint is loaded next)",
                               missing_weights_message(config.weights))
                return f"backbone {name}: random initialisation ({config.weights} not found)"
            head_keys = set() if swin else full_model_keys(name, config.kwargs) - set(self.body.state_dict())
            summary = load_backbone_weights(self.body, name, path, swin=swin, head_keys=head_keys)
            logger.info("%s", summary)
            return summary
        from ..interop.efficientnet_lite import LITE_WEIGHTS, load_imagenet_weights

        if swin or name not in LITE_WEIGHTS:
            raise ValueError(f"backbone {name}: pretrained=true needs model.backbone.weights=PATH (no offline "
                             f"ImageNet weights for it; offline: {', '.join(sorted(LITE_WEIGHTS))}), or "
                             f"model.backbone.pretrained=false for random initialisation")
        load_imagenet_weights(self.body, name)
        return f"backbone {name}: offline ImageNet weights (interop/efficientnet_lite.py)"

    def forward(self, images: Tensor) -> list[Tensor]:
        if not self.channels_last:
            return list(self.body(images))
        # The features go back to NCHW: the pixel decoder's dense 3x3 convolutions are faster there.
        return [feature.contiguous() for feature in self.body(images.contiguous(memory_format=torch.channels_last))]


# False while a checkpoint is about to replace every backbone tensor (see skip_imagenet_weights).
_LOAD_WEIGHTS: contextvars.ContextVar[bool] = contextvars.ContextVar("load_imagenet_weights", default=True)


@contextlib.contextmanager
def skip_imagenet_weights() -> Iterator[None]:
    """Build backbones without reading ``weights`` files, for a model whose checkpoint is loaded next."""
    token = _LOAD_WEIGHTS.set(False)
    try:
        yield
    finally:
        _LOAD_WEIGHTS.reset(token)


def freeze_stages(body: nn.Module, level_modules: list[str], freeze_at: int) -> None:
    """Stop gradients to the stem (``freeze_at >= 1``) and to res2..res_k (``freeze_at = k``).

    ``level_modules`` names the modules that output res2..res5. Parameters are registered in forward order in timm's
    CNNs and our Swin, so the frozen part is a prefix: everything before res2's module (the stem), then each level's
    module in turn. Batch norms in the frozen part use their running statistics, as detectron2's FrozenBN does.
    """
    if not 0 <= freeze_at <= len(level_modules) + 1:
        raise ValueError(f"backbone.freeze_at must be in 0..{len(level_modules) + 1}, got {freeze_at}")
    if freeze_at == 0:
        return
    names = [name for name, _ in body.named_parameters()]
    if freeze_at == 1:
        cut = next(index for index, name in enumerate(names) if name.startswith(level_modules[0] + "."))
    else:
        prefix = level_modules[freeze_at - 2] + "."
        cut = max(index for index, name in enumerate(names) if name.startswith(prefix)) + 1
    frozen = set(names[:cut])
    for name, param in body.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    for name, module in list(body.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(n.startswith(name + ".") for n in frozen):
            parent_name, _, child = name.rpartition(".")
            setattr(body.get_submodule(parent_name) if parent_name else body, child, freeze_batch_norm_2d(module))
