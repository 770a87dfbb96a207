"""ONNX export of the inference graph (no post-processing) and an onnxruntime runner that the Predictor accepts."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from ..config import ModelConfig, from_dict
from ..modeling.model import Mask2Former, Mask2FormerOutput


class _InferenceGraph(nn.Module):
    """Normalised images -> (pred_logits, pred_masks) of the last decoder layer."""

    def __init__(self, model: Mask2Former) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model(images, aux_outputs=False)
        return outputs.pred_logits, outputs.pred_masks


def export_onnx(checkpoint: str | Path | Mask2Former, out: str | Path, height: int = 256, width: int = 256,
                opset: int = 17) -> dict[str, Any]:
    """Export with a dynamic batch at a fixed ``height`` x ``width``; check against PyTorch with onnxruntime on two
    input sizes (the export size, and a smaller one that ``OnnxModel`` pads up to it).

    The image size is fixed because padding, position encodings and deformable-attention level shapes are computed
    from Python integers, which the TorchScript exporter freezes (the dynamo exporter keeps them symbolic but took
    over 15 minutes on a 2-core CPU for the default model). Writes ``out`` and ``<stem>.yaml`` beside it (model
    config, label space and export size), which ``OnnxModel`` reads. Returns a report with max abs differences."""
    model = checkpoint if isinstance(checkpoint, Mask2Former) else Mask2Former.from_pretrained(checkpoint)
    model = model.eval().float()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    divisor = model.config.size_divisibility
    if height % divisor or width % divisor or height < 2 * divisor or width < 2 * divisor:
        raise ValueError(f"export size {height}x{width} must be a multiple of {divisor} and at least {2 * divisor}")
    example = torch.zeros(2, 3, height, width)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _InferenceGraph(model).eval(), (example,), str(out), dynamo=False, opset_version=opset,
            input_names=["images"], output_names=["pred_logits", "pred_masks"],
            dynamic_axes={"images": {0: "batch"}, "pred_logits": {0: "batch"}, "pred_masks": {0: "batch"}},
        )
    _write_sidecar(model, out, (height, width))
    runner = OnnxModel(out)
    report: dict[str, Any] = {"onnx": str(out), "input_size": [height, width], "checks": []}
    generator = torch.Generator().manual_seed(0)
    for batch_size, (h, w) in ((1, (height, width)), (2, (height - divisor, width - 2 * divisor if width > 2 * divisor else width))):
        images = torch.randn(batch_size, 3, h, w, generator=generator)
        got = runner(images)
        with torch.no_grad():
            # OnnxModel zero-pads smaller inputs to the export size; compare with PyTorch on that same input.
            expected = model(runner.pad_to_export_size(images))
        report["checks"].append({
            "input": [batch_size, 3, h, w],
            "max_abs_diff_logits": float((expected.pred_logits - got.pred_logits).abs().max()),
            "max_abs_diff_masks": float((expected.pred_masks[..., : h // 4, : w // 4] - got.pred_masks).abs().max()),
        })
    return report


def _write_sidecar(model: Mask2Former, out: Path, input_size: tuple[int, int]) -> None:
    from ..config import to_dict

    document = {"model": to_dict(model.config), "labels": model.labels, "input_size": list(input_size)}
    (out.parent / f"{out.stem}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))


class OnnxModel:
    """Runs an exported model with onnxruntime and looks like a ``Mask2Former`` to the ``Predictor``."""

    training = False

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime

        path = Path(path)
        sidecar = path.parent / f"{path.stem}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        if not sidecar.exists():
            raise FileNotFoundError(f"{sidecar} is missing: it holds the model config written by `mask2former export`")
        document = yaml.safe_load(sidecar.read_text())
        self.config: ModelConfig = from_dict(ModelConfig, document["model"], "model")
        self.labels = document.get("labels")
        self.input_size = tuple(document["input_size"])
        self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        self.pixel_mean = torch.tensor(self.config.pixel_mean).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(self.config.pixel_std).view(1, 3, 1, 1)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def normalize(self, images: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return Mask2Former.normalize(self, images, padding_mask)  # same arithmetic as the PyTorch model

    def to(self, *args, **kwargs) -> "OnnxModel":
        return self

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        return self

    def pad_to_export_size(self, images: Tensor) -> Tensor:
        """Zero-pad normalised images bottom/right to the export size (zero is what padding is after normalisation)."""
        height, width = images.shape[-2:]
        if height > self.input_size[0] or width > self.input_size[1]:
            raise ValueError(
                f"image batch of {height}x{width} is larger than the ONNX model's input size "
                f"{self.input_size[0]}x{self.input_size[1]}: re-export with --height/--width or predict with --max-size"
            )
        return F.pad(images, (0, self.input_size[1] - width, 0, self.input_size[0] - height))

    def __call__(self, images: Tensor, aux_outputs: bool = False) -> Mask2FormerOutput:
        """Only the final prediction exists in the exported graph; ``aux_outputs`` is accepted for the Predictor."""
        height, width = images.shape[-2:]
        padded = self.pad_to_export_size(images.detach().cpu().float())
        logits, masks = self.session.run(None, {"images": padded.numpy()})
        masks = torch.from_numpy(np.asarray(masks))[..., : height // 4, : width // 4]
        return Mask2FormerOutput(torch.from_numpy(np.asarray(logits)), masks)
