"""ONNX export of the inference graph (no post-processing) with dynamic batch, height and width, int8 quantisation
of the exported file, and an onnxruntime runner that the Predictor accepts."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from ..config import ModelConfig, from_dict
from ..modeling.model import Mask2Former, Mask2FormerOutput

QUANTIZE_MODES = ("int8",)
# Dynamic quantisation of the Linear layers only (MatMul with a constant weight), per tensor. Measured on the default
# model (256², 2 threads, 8 val images): MatMul only 0.9997 mask-sign agreement with fp32 and the fastest; adding
# dynamic Conv (ConvInteger) 0.996 and ~3x slower; static QDQ (Conv or Conv+MatMul, per channel, 16 FashionScenes
# train images for calibration) 0.995 and no faster than fp32. Per-channel MatMul weights: Swin-T 0.977 vs 0.972.
INT8_OP_TYPES = ("MatMul",)


class _InferenceGraph(nn.Module):
    """Normalised images -> (pred_logits, pred_masks) of the last decoder layer."""

    def __init__(self, model: Mask2Former) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model(images, aux_outputs=False)
        return outputs.pred_logits, outputs.pred_masks


def default_check_sizes(height: int, width: int, divisor: int) -> list[tuple[int, int, int]]:
    """(batch, H, W) checked after export: square, non-square, and one that the graph must pad (not a multiple of
    ``divisor``), none of them all equal to the traced size's aspect."""
    side = max(height, width)
    return [(1, side, side), (2, height, width + 2 * divisor if width + 2 * divisor != height else width + 3 * divisor),
            (1, height + divisor - 5, width - divisor + 3 if width > 2 * divisor else width + 3)]


def export_onnx(checkpoint: str | Path | Mask2Former, out: str | Path, height: int = 256, width: int = 256,
                opset: int = 17, quantize: str | None = None,
                check_sizes: Sequence[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """Export one file that runs at any batch size, height and width (traced at ``height`` x ``width``), check it
    against PyTorch with onnxruntime on ``check_sizes`` (default: square, non-square, needs padding), and with
    ``quantize="int8"`` also write ``<stem>.int8.onnx`` (see ``quantize_onnx``) and compare it with the fp32 file.

    The TorchScript exporter is used: under tracing the input's sizes are 0-dim tensors, and the model keeps them
    as tensors where a shape is computed (padding to ``size_divisibility``, Swin window padding and masks, position
    encodings, deformable-attention level sizes and splits, mask resizes), so nothing size-dependent is frozen. It
    exports the default model in 3.5 s and Swin-T in 5 s on 2 cores (benchmarks/deploy.py), where the dynamo
    exporter (``dynamo=True``, dynamic H and W) had not finished its torch.export step after 7 minutes. Writes ``out`` and ``<stem>.yaml`` beside it (model config and label
    space), which ``OnnxModel`` reads. Returns a report.

    Masked attention thresholds mask logits at 0, so a logit within float error of 0 can flip a query's attention:
    Swin-T at 2x512x576 differed by 1.4e-3 from PyTorch, as much as PyTorch's own C kernel and grid_sample paths
    differ from each other on that input; 7.7e-5 at the other sizes, <= 9.2e-5 for the default model."""
    model = checkpoint if isinstance(checkpoint, Mask2Former) else Mask2Former.from_pretrained(checkpoint)
    model = model.eval().float()
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"export: quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"export: output file {out} must end in .onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    divisor = max(model.config.size_divisibility, 1)
    if height < 2 * divisor or width < 2 * divisor:
        raise ValueError(f"export: trace size {height}x{width} must be at least {2 * divisor} on each side")
    example = torch.zeros(2, 3, height, width)
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # The only TracerWarnings left are for Python values that do not reach the graph (the output's sizes).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _InferenceGraph(model).eval(), (example,), str(out), dynamo=False, opset_version=opset,
            input_names=["images"], output_names=["pred_logits", "pred_masks"],
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "pred_logits": {0: "batch"},
                          "pred_masks": {0: "batch", 2: "mask_height", 3: "mask_width"}},
        )
    export_seconds = time.perf_counter() - start
    _write_sidecar(model, out, (height, width), "fp32")
    report: dict[str, Any] = {"onnx": str(out), "traced_size": [height, width], "dynamic_axes": ["batch", "height", "width"],
                              "export_seconds": round(export_seconds, 2), "checks": []}
    runner = OnnxModel(out)
    inputs = []
    generator = torch.Generator().manual_seed(0)
    for batch_size, h, w in check_sizes or default_check_sizes(height, width, divisor):
        images = torch.randn(batch_size, 3, h, w, generator=generator)
        inputs.append(images)
        got = runner(images)
        with torch.no_grad():
            expected = model(images, aux_outputs=False)
        if tuple(got.pred_masks.shape) != tuple(expected.pred_masks.shape):
            raise RuntimeError(f"export: ONNX masks {tuple(got.pred_masks.shape)} != PyTorch "
                               f"{tuple(expected.pred_masks.shape)} at input {batch_size}x3x{h}x{w}")
        report["checks"].append({
            "input": [batch_size, 3, h, w],
            "padded": list(expected.padded_size),
            "max_abs_diff_logits": float((expected.pred_logits - got.pred_logits).abs().max()),
            "max_abs_diff_masks": float((expected.pred_masks - got.pred_masks).abs().max()),
        })
    report["max_abs_diff_masks"] = max(check["max_abs_diff_masks"] for check in report["checks"])
    report["max_abs_diff_logits"] = max(check["max_abs_diff_logits"] for check in report["checks"])
    if quantize == "int8":
        quantized = out.with_name(f"{out.stem}.int8.onnx")
        start = time.perf_counter()
        quantize_onnx(out, quantized)
        report["int8"] = {"onnx": str(quantized), "quantize_seconds": round(time.perf_counter() - start, 2),
                          "op_types": list(INT8_OP_TYPES), "note": PRE_PROCESS_NOTE, "checks": []}
        int8_runner = OnnxModel(quantized)
        for images in inputs:
            reference, got = runner(images), int8_runner(images)
            report["int8"]["checks"].append({
                "input": list(images.shape),
                "mask_sign_agreement": float(((reference.pred_masks > 0) == (got.pred_masks > 0)).float().mean()),
                "max_abs_diff_logits": float((reference.pred_logits - got.pred_logits).abs().max()),
            })
    return report


# onnxruntime logs "Please consider to run pre-processing before quantization" (on the root logger) for every file
# that did not go through its quant_pre_process; the report carries this note instead.
PRE_PROCESS_NOTE = ("onnxruntime's optional quant_pre_process (shape inference and graph fusions) is not run: the "
                    "exported graph is quantised as it is, and 'checks' below measure the int8 file against PyTorch")


def _drop_pre_process_advice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(("Please consider to run pre-processing", "Please consider pre-processing"))


def quantize_onnx(source: str | Path, out: str | Path, op_types: Sequence[str] = INT8_OP_TYPES) -> Path:
    """onnxruntime dynamic int8 quantisation of an exported fp32 file (weights uint8 per tensor, activations
    quantised per call), with the sidecar copied as ``precision: int8``. Only MatMuls with a constant weight are
    quantised (not attention's activation x activation products)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, out = Path(source), Path(out)
    sidecar = source.parent / f"{source.stem}.yaml"
    if not sidecar.exists():
        raise FileNotFoundError(f"quantize: {sidecar} is missing: export the fp32 model with `mask2former export`")
    root = logging.getLogger()
    # uint8 weights: on x86 CPUs without VNNI, onnxruntime's u8 x s8 kernels add pairs of products in saturating
    # int16, which int8 weights overflow (confident mask signs agreed 0.93 on an AVX2-only EPYC, 0.975 with
    # reduce_range; > 0.98 with u8 x u8). The file may run on any CPU, so it is always written this way.
    root.addFilter(_drop_pre_process_advice)
    try:
        quantize_dynamic(str(source), str(out), op_types_to_quantize=list(op_types), weight_type=QuantType.QUInt8,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.removeFilter(_drop_pre_process_advice)
    document = yaml.safe_load(sidecar.read_text())
    document["precision"] = "int8"
    (out.parent / f"{out.stem}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return out


def _write_sidecar(model: Mask2Former, out: Path, traced_size: tuple[int, int], precision: str) -> None:
    from ..config import to_dict

    document = {"model": to_dict(model.config), "labels": model.labels, "dynamic_size": True,
                "traced_size": list(traced_size), "precision": precision}
    (out.parent / f"{out.stem}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))


class OnnxModel:
    """Runs an exported model with onnxruntime and looks like a ``Mask2Former`` to the ``Predictor``.

    Files from ``export_onnx`` take any size (the graph pads to ``size_divisibility`` itself). Files written before
    dynamic sizes (a sidecar with ``input_size``) are run as before: inputs zero-padded up to that one size.
    ``threads``: onnxruntime intra-op threads (None: its default); ``spinning``: let idle pool threads spin (faster
    only on otherwise idle cores)."""

    training = False

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 spinning: bool = False) -> None:
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
        self.precision = document.get("precision", "fp32")
        # Only the old fixed-size files carry ``input_size``.
        self.input_size = None if document.get("dynamic_size") else tuple(document["input_size"])
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            # Idle pool threads sleep instead of spinning: with PyTorch's threads, post-processing or other
            # processes on the same cores, spinning made a 2-thread session 2-3x slower here (benchmarks/deploy.py).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"])
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
        """Fixed-size (old) files only: zero-pad normalised images bottom/right to their one input size."""
        height, width = images.shape[-2:]
        if height > self.input_size[0] or width > self.input_size[1]:
            raise ValueError(
                f"image batch of {height}x{width} is larger than the ONNX model's input size "
                f"{self.input_size[0]}x{self.input_size[1]}: re-export it (exports now take any size)"
            )
        return F.pad(images, (0, self.input_size[1] - width, 0, self.input_size[0] - height))

    def __call__(self, images: Tensor, aux_outputs: bool = False) -> Mask2FormerOutput:
        """Only the final prediction exists in the exported graph; ``aux_outputs`` is accepted for the Predictor.
        Returns masks for the padded input (multiples of ``size_divisibility``), as ``Mask2Former.forward``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"OnnxModel: images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        height, width = int(images.shape[-2]), int(images.shape[-1])
        images = images.detach().cpu().float()
        if self.input_size is not None:
            logits, masks = self.session.run(None, {"images": self.pad_to_export_size(images).numpy()})
            masks = torch.from_numpy(np.asarray(masks))[..., : height // 4, : width // 4]
            return Mask2FormerOutput(torch.from_numpy(np.asarray(logits)), masks)
        logits, masks = self.session.run(None, {"images": images.contiguous().numpy()})
        divisor = max(self.config.size_divisibility, 1)
        padded = (height + (-height) % divisor, width + (-width) % divisor)
        return Mask2FormerOutput(torch.from_numpy(np.asarray(logits)), torch.from_numpy(np.asarray(masks)),
                                 image_size=(height, width), padded_size=padded)
