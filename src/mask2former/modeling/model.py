"""The meta-architecture: backbone -> pixel decoder -> transformer decoder -> (class logits, mask logits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .backbone import Backbone
from .piloting import QueryPiloting
from .pixel_decoder import FPNPixelDecoder, MSDeformAttnPixelDecoder
from .transformer_decoder import MaskedTransformerDecoder, StandardTransformerDecoder


@dataclass
class Mask2FormerOutput:
    """``pred_logits`` [B, Q, K+1] (last = no object), ``pred_masks`` [B, Q, H/4, W/4] mask logits, and
    ``aux_outputs``: the earlier predictions, oldest first, as ``{"pred_logits", "pred_masks"}`` dicts.
    ``piloted``: MP-Former's mask-piloted predictions (training only), same layout, or None.

    ``padded_size``: (Hp, Wp) the network ran on, the input zero-padded bottom/right to multiples of
    ``size_divisibility`` (``pred_masks`` is Hp/4 x Wp/4); ``image_size``: (H, W) of the input as given, the valid
    top-left region of ``padded_size``. None when the producer does not know them (e.g. an ONNX runner)."""

    pred_logits: Tensor
    pred_masks: Tensor
    aux_outputs: list[dict[str, Tensor]] = field(default_factory=list)
    piloted: dict[str, Any] | None = None
    image_size: tuple[int, int] | None = None
    padded_size: tuple[int, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"pred_logits": self.pred_logits, "pred_masks": self.pred_masks, "aux_outputs": self.aux_outputs}


class Mask2Former(nn.Module):
    """Mask2Former (default) or MaskFormer (``pixel_decoder="fpn"``, ``transformer_decoder="standard"``)."""

    def __init__(self, config: ModelConfig | None = None, labels: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        # The label space (LabelSpace.to_dict()) travels with the weights so a checkpoint knows its classes.
        self.labels = labels
        self.backbone = Backbone(config.backbone)
        in_channels = self.backbone.out_channels
        if config.pixel_decoder == "msdeformattn":
            self.pixel_decoder: nn.Module = MSDeformAttnPixelDecoder(
                in_channels, config.conv_dim, config.mask_dim, config.enc_layers, config.num_heads,
                config.enc_points, config.enc_ffn_dim, config.enc_dropout, config.pixel_decoder_fp32,
            )
            memory_channels = config.conv_dim
        elif config.pixel_decoder == "fpn":
            self.pixel_decoder = FPNPixelDecoder(in_channels, config.conv_dim, config.mask_dim)
            memory_channels = in_channels[-1]
        else:
            raise ValueError(f"unknown pixel_decoder {config.pixel_decoder!r} (msdeformattn or fpn)")
        if config.transformer_decoder == "masked":
            if config.pixel_decoder != "msdeformattn":
                raise ValueError("the masked decoder needs the three maps of the msdeformattn pixel decoder")
            self.transformer_decoder: nn.Module = MaskedTransformerDecoder(
                memory_channels, config.num_classes, config.hidden_dim, config.num_queries, config.num_heads,
                config.dim_feedforward, config.dec_layers, config.mask_dim, config.query_pos, config.enforce_input_proj,
                config.mask_piloting,
            )
        elif config.transformer_decoder == "standard":
            if config.mask_piloting:
                raise ValueError("model.mask_piloting (MP-Former) needs the masked decoder (transformer_decoder: masked)")
            if config.pixel_decoder == "msdeformattn":
                memory_channels = config.conv_dim  # attend to the encoder's 1/32 output
            self.transformer_decoder = StandardTransformerDecoder(
                memory_channels, config.num_classes, config.hidden_dim, config.num_queries, config.num_heads,
                config.dim_feedforward, config.dec_layers, config.mask_dim, config.dropout, config.enforce_input_proj,
            )
        else:
            raise ValueError(f"unknown transformer_decoder {config.transformer_decoder!r} (masked or standard)")
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def normalize(self, images: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """uint8 or 0-255 float RGB [B, 3, H, W] -> normalised float. Padded pixels (``padding_mask`` True) become
        0 after normalisation, as the reference pads the normalised batch with zeros."""
        images = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        if padding_mask is not None:
            images = images.masked_fill(padding_mask.unsqueeze(1), 0.0)
        return images

    def pad(self, images: Tensor) -> Tensor:
        """Zero-pad normalised [B, 3, H, W] images bottom/right to multiples of ``size_divisibility`` (as detectron2's
        ``ImageList.from_tensors``; zero is the padding value after normalisation). No-op when already divisible."""
        divisor = self.config.size_divisibility
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Mask2Former.forward: images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if divisor <= 1:
            return images
        pad_h, pad_w = -images.shape[-2] % divisor, -images.shape[-1] % divisor
        # Under tracing (ONNX export) the sizes are 0-dim tensors and the pad always stays in the graph, so one
        # exported file pads every input size; in eager mode a divisible batch is passed through untouched.
        if not torch.jit.is_tracing() and pad_h == 0 and pad_w == 0:
            return images
        return F.pad(images, (0, pad_w, 0, pad_h))

    def forward(self, images: Tensor, piloting: QueryPiloting | None = None, aux_outputs: bool = True
                ) -> Mask2FormerOutput:
        """images: normalised [B, 3, H, W] of any size; zero-padded here to multiples of ``size_divisibility``
        (an already padded batch is used as is). The output's ``image_size`` / ``padded_size`` say which part of
        the (padded) prediction is the input.

        ``aux_outputs=False`` (inference) skips the earlier layers' predictions, which only deep supervision needs.

        ``piloting``: MP-Former's extra queries (``modeling/piloting.py``; ``training/mask_piloting.py`` builds them
        from a batch); training only, ignored in eval mode, so inference is exactly Mask2Former's."""
        if not self.training:
            piloting = None
        padded = self.pad(images)
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        padded_size = (int(padded.shape[-2]), int(padded.shape[-1]))
        images = padded
        features = self.backbone(images)
        mask_features, multi_scale = self.pixel_decoder(features)
        predictions = self.transformer_decoder(multi_scale, mask_features, piloting, intermediate=aux_outputs)
        if piloting is not None:
            predictions, piloted = piloting.split_predictions(predictions)
        else:
            piloted = None
        aux = [{"pred_logits": logits, "pred_masks": masks} for logits, masks in predictions[:-1]]
        return Mask2FormerOutput(predictions[-1][0], predictions[-1][1], aux, piloted, image_size, padded_size)

    # ----- checkpoints -------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``config.yaml`` (model config + label space) and ``model.safetensors`` into directory ``path``."""
        from ..interop.checkpoint import save_pretrained

        save_pretrained(self, path, extra)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: str | None = None, num_classes: int | None = None, map_location: str = "cpu",
    ) -> "Mask2Former":
        """Load our own directory, a transformers Mask2Former directory (config.json + model.safetensors), or an
        official detectron2 ``model_final_*.pkl`` (pass ``config``: the preset it was trained with); or a name:
        a Hugging Face Hub id ``org/name[@revision]`` or a model-zoo name such as ``coco_panoptic_r50``
        (``interop/hub.py``; a local path always wins).

        ``num_classes``: build a model with another class count; everything but the class head is loaded."""
        from .pretrained import load_pretrained

        return load_pretrained(cls, path, config=config, num_classes=num_classes, map_location=map_location)
