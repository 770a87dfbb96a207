"""ONNX export of the inference graph (no post-processing) with dynamic batch, height and width, checked against
PyTorch on the runtime that will run it, and onnxruntime's dynamic int8 quantisation of the exported file. The
runners are in ``inference/runtimes.py`` (``OnnxModel`` is onnxruntime's, kept under its old name)."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import Tensor, nn

from ..inference.runtimes import RUNTIMES, OnnxRuntimeModel, import_optional, load_exported
from ..modeling.model import Mask2Former

OnnxModel = OnnxRuntimeModel  # the name tests, benchmarks and users' scripts import

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
                check_sizes: Sequence[tuple[int, int, int]] | None = None,
                runtime: str = "onnxruntime", check: bool = True) -> dict[str, Any]:
    """Export one file that runs at any batch size, height and width (traced at ``height`` x ``width``), check it
    against PyTorch on ``runtime`` (onnxruntime or openvino, fp32) at ``check_sizes`` (default: square, non-square,
    needs padding), and with ``quantize="int8"`` also write ``<stem>.int8.onnx`` (onnxruntime's dynamic int8, see
    ``quantize_onnx``) and compare it with the fp32 file (on onnxruntime, which runs its operators). ``check=False``
    skips the comparison (for a caller that checks what it converts the file into).

    The TorchScript exporter is used: under tracing the input's sizes are 0-dim tensors, and the model keeps them
    as tensors where a shape is computed (padding to ``size_divisibility``, Swin window padding and masks, position
    encodings, deformable-attention level sizes and splits, mask resizes), so nothing size-dependent is frozen. It
    exports the default model in 3.5 s and Swin-T in 5 s on 2 cores (benchmarks/deploy.py), where the dynamo
    exporter (``dynamo=True``, dynamic H and W) had not finished its torch.export step after 7 minutes. Writes ``out`` and ``<stem>.yaml`` beside it (model config and label
    space), which ``OnnxModel`` reads. Returns a report.

    Masked attention thresholds mask logits at 0, so a logit within float error of 0 can flip a query's attention:
    Swin-T at 2x512x576 differed by 1.4e-3 from PyTorch, as much as PyTorch's own C kernel and grid_sample paths
    differ from each other on that input; 7.7e-5 at the other sizes, <= 9.2e-5 for the default model."""
    if runtime not in RUNTIMES:
        raise ValueError(f"export: runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    import_optional("onnx", "export")  # torch.onnx.export writes the file with it
    import_optional(runtime, f"checking the export on {runtime}")
    if quantize is not None:
        import_optional("onnxruntime", "onnxruntime int8 quantisation")
    model = checkpoint if isinstance(checkpoint, Mask2Former) else Mask2Former.from_pretrained(checkpoint)
    model = model.eval().float()
    if quantize is not None and not check:
        raise ValueError("export: quantize needs check=True (the int8 file is compared with the checked fp32 file)")
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
                              "export_seconds": round(export_seconds, 2), "checked_on": runtime, "checks": []}
    if not check:
        return report
    runner = load_exported(out, runtime)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch_size, 3, h, w, generator=generator)
              for batch_size, h, w in check_sizes or default_check_sizes(height, width, divisor)]
    report["checks"] = compare_with_pytorch(model, runner, inputs)
    report["checked_precision"] = runner.precision
    report["max_abs_diff_masks"] = max(check["max_abs_diff_masks"] for check in report["checks"])
    report["max_abs_diff_logits"] = max(check["max_abs_diff_logits"] for check in report["checks"])
    if quantize == "int8":
        quantized = out.with_name(f"{out.stem}.int8.onnx")
        start = time.perf_counter()
        quantize_onnx(out, quantized)
        report["int8"] = {"onnx": str(quantized), "quantize_seconds": round(time.perf_counter() - start, 2),
                          "op_types": list(INT8_OP_TYPES), "note": PRE_PROCESS_NOTE, "checks": []}
        reference_runner = runner if runtime == "onnxruntime" else OnnxModel(out)
        int8_runner = OnnxModel(quantized)
        for images in inputs:
            report["int8"]["checks"].append({"input": list(images.shape),
                                             **mask_agreement(reference_runner(images), int8_runner(images))})
    return report


def compare_with_pytorch(model: Mask2Former, runner: Any, inputs: Sequence[Tensor]) -> list[dict[str, Any]]:
    """Max |diff| of an exported model's logits and masks to PyTorch's on each input batch (shapes must match)."""
    checks = []
    for images in inputs:
        got = runner(images)
        with torch.no_grad():
            expected = model(images, aux_outputs=False)
        if tuple(got.pred_masks.shape) != tuple(expected.pred_masks.shape):
            raise RuntimeError(f"export: {getattr(runner, 'runtime', 'exported')} masks {tuple(got.pred_masks.shape)} "
                               f"!= PyTorch {tuple(expected.pred_masks.shape)} at input {list(images.shape)}")
        checks.append({
            "input": list(images.shape),
            "padded": list(expected.padded_size),
            "max_abs_diff_logits": float((expected.pred_logits - got.pred_logits).abs().max()),
            "max_abs_diff_masks": float((expected.pred_masks - got.pred_masks).abs().max()),
        })
    return checks


def mask_agreement(reference: Any, got: Any) -> dict[str, float]:
    """Mask-sign agreement and max |diff| of the logits between two outputs (int8 against fp32)."""
    return {"mask_sign_agreement": float(((reference.pred_masks > 0) == (got.pred_masks > 0)).float().mean()),
            "max_abs_diff_logits": float((reference.pred_logits - got.pred_logits).abs().max())}


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
