"""ONNX export of the inference graph (no post-processing) and an onnxruntime runner that the Predictor accepts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
        outputs = self.model(images)
        return outputs.pred_logits, outputs.pred_masks


def export_onnx(checkpoint: str | Path | Mask2Former, out: str | Path, height: int = 256, width: int = 256,
                opset: int = 18, check_sizes: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Export with dynamic batch, height and width; check against PyTorch on two input sizes with onnxruntime.

    Writes ``out`` and ``config.yaml`` beside it (the model config and label space, which ``OnnxModel`` reads).
    Returns a report with the max absolute differences."""
    model = checkpoint if isinstance(checkpoint, Mask2Former) else Mask2Former.from_pretrained(checkpoint)
    model = model.eval().float()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    divisor = model.config.size_divisibility
    if height % divisor or width % divisor:
        raise ValueError(f"export size {height}x{width} must be a multiple of {divisor}")
    example = torch.randn(2, 3, height, width)  # batch 2: a size-1 example would be specialised
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic_h = torch.export.Dim("height_blocks", min=2, max=128)
    dynamic_w = torch.export.Dim("width_blocks", min=2, max=128)
    dynamic_shapes = {"images": {0: batch, 2: divisor * dynamic_h, 3: divisor * dynamic_w}}
    with torch.no_grad():
        program = torch.onnx.export(
            _InferenceGraph(model).eval(), (example,), dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
            input_names=["images"], output_names=["pred_logits", "pred_masks"],
            optimize=False,  # onnxscript's graph optimiser takes minutes here and gains little at run time
        )
    program.save(str(out))
    _write_sidecar(model, out)
    sizes = check_sizes or [(height, width), (height + 2 * divisor, width + divisor)]
    runner = OnnxModel(out)
    report: dict[str, Any] = {"onnx": str(out), "checks": []}
    for batch_size, (h, w) in zip((1, 2), sizes):
        images = torch.randn(batch_size, 3, h, w)
        with torch.no_grad():
            expected = model(images)
        got = runner(images)
        report["checks"].append({
            "input": [batch_size, 3, h, w],
            "max_abs_diff_logits": float((expected.pred_logits - got.pred_logits).abs().max()),
            "max_abs_diff_masks": float((expected.pred_masks - got.pred_masks).abs().max()),
        })
    return report


def _write_sidecar(model: Mask2Former, out: Path) -> None:
    from ..config import to_dict

    document = {"model": to_dict(model.config), "labels": model.labels}
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

    def __call__(self, images: Tensor) -> Mask2FormerOutput:
        logits, masks = self.session.run(None, {"images": images.detach().cpu().float().numpy()})
        return Mask2FormerOutput(torch.from_numpy(np.asarray(logits)), torch.from_numpy(np.asarray(masks)))
