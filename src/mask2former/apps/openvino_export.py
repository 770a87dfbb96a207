"""``mask2former export --format openvino``: the ONNX export (``apps/onnx.py``) converted to OpenVINO IR
(``.xml`` + ``.bin``, fp32 weights) and, with ``quantize="int8"``, NNCF post-training quantisation of that model
(static int8, activation ranges calibrated on training images), each checked against PyTorch on OpenVINO.

The IR is written because NNCF's int8 model can only be saved as IR; for fp32, OpenVINO reads the ``.onnx`` file
itself as fast as its IR (default model, 2-core EPYC under load, 4 alternating loads: read 0.2-0.8 s from ONNX vs
0.3-0.6 s from IR, compile 4-8 s either way),
so ``predict --onnx model.onnx --runtime openvino`` needs no conversion step."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch import Tensor

from ..data.collate import pad_images
from ..inference.predictor import resize_shortest_edge, to_uint8_chw
from ..inference.runtimes import ExportedModel, import_optional, load_exported, sidecar_path
from ..modeling.model import Mask2Former
from .onnx import compare_with_pytorch, default_check_sizes, export_onnx, mask_agreement

# NNCF's own default calibration subset size (``subset_size=300``), as optimum-intel's ``num_samples`` also uses.
DEFAULT_CALIBRATION_IMAGES = 300
# Images of the calibration source not used for calibration, on which the int8 model is compared with fp32.
HELD_OUT_IMAGES = 4
# model_type=TRANSFORMER keeps LayerNorm/Softmax inputs and attention's activation x activation products out of
# int8 and uses its SmoothQuant-style handling of MatMuls. Measured on the default model (100 train images for
# calibration, 8 val images): mask-sign agreement with PyTorch fp32 0.9945 (0.998 where |logit| > 0.25 std),
# against 0.962 (0.972) with NNCF's default (CNN) settings.
MODEL_TYPE = "transformer"

log = logging.getLogger(__name__)


def calibration_images(count: int, directory: str | Path | None = None, size: int | None = None) -> list[Tensor]:
    """``count`` uint8 [3, H, W] images: the first ``count`` image files of ``directory`` (sorted by name; the
    shortest edge resized to ``size`` when given), or by default FashionScenes *train* images (never val: the
    int8 model's PQ is measured on val)."""
    if count < 1:
        raise ValueError(f"export: --calibration-images must be at least 1, got {count}")
    if directory is None:
        from ..data.fashion_scenes import FashionScenes

        dataset = FashionScenes("train", num_images=count)
        return [dataset[index]["image"] for index in range(count)]
    from .predict_files import collect_images

    paths, errors = collect_images([str(directory)], recursive=True)
    if errors:
        raise ValueError(f"export: calibration image {errors[0][0]}: {errors[0][1]}")
    if len(paths) < count:
        raise ValueError(f"export: --calibration-dir {directory} has {len(paths)} images, {count} asked for")
    return [resize_shortest_edge(to_uint8_chw(path, str(path)), size, None) for path in paths[:count]]


def normalised(model: Mask2Former | Any, image: Tensor) -> np.ndarray:
    """One uint8 [3, H, W] image as the Predictor feeds it: normalised, padded to ``size_divisibility``."""
    batch, padding_mask, _ = pad_images([image], max(model.config.size_divisibility, 1))
    return model.normalize(batch, padding_mask).numpy()


def quantize_openvino(source: str | Path, out: str | Path, images: Sequence[Tensor],
                      preset: str = "performance") -> Path:
    """NNCF post-training int8 quantisation of an exported model (``.onnx`` or IR), calibrated on ``images``
    (uint8 [3, H, W]); writes ``out`` (IR) and its sidecar with ``precision: int8``."""
    openvino = import_optional("openvino", "OpenVINO int8 quantisation")
    nncf = import_optional("nncf", "OpenVINO int8 quantisation")
    source, out = Path(source), Path(out)
    runner = ExportedModel(source)  # the sidecar: normalisation constants, size_divisibility
    model = openvino.Core().read_model(str(source))
    data = [normalised(runner, image) for image in images]
    quantized = nncf.quantize(
        model, nncf.Dataset(data), subset_size=len(data), model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.PERFORMANCE if preset == "performance" else nncf.QuantizationPreset.MIXED)
    openvino.save_model(quantized, str(out), compress_to_fp16=False)
    document = yaml.safe_load(sidecar_path(source).read_text())
    document["precision"] = "int8"
    document["quantization"] = {"tool": f"nncf {nncf.__version__}", "model_type": MODEL_TYPE, "preset": preset,
                                "calibration_images": len(data)}
    sidecar_path(out).write_text(yaml.safe_dump(document, sort_keys=False))
    return out


def export_openvino(checkpoint: str | Path | Mask2Former, out: str | Path, height: int = 256, width: int = 256,
                    quantize: str | None = None, calibration_count: int = DEFAULT_CALIBRATION_IMAGES,
                    calibration_dir: str | Path | None = None,
                    check_sizes: Sequence[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """Write ``out`` (``.xml`` + ``.bin``, dynamic batch/height/width, fp32) and ``<stem>.yaml``, checked against
    PyTorch on OpenVINO f32; with ``quantize="int8"`` also ``<stem>.int8.xml`` (``quantize_openvino``, calibrated
    on ``calibration_count`` images, see ``calibration_images``) compared with the fp32 IR on held-out images
    of the same source and on the random check inputs. Returns a report."""
    openvino = import_optional("openvino", "export --format openvino")
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"export: quantize must be int8, got {quantize!r}")
        import_optional("nncf", "export --format openvino --quantize int8")
    out = Path(out)
    if out.suffix != ".xml":
        raise ValueError(f"export: OpenVINO output file {out} must end in .xml (its weights go to {out.stem}.bin)")
    model = checkpoint if isinstance(checkpoint, Mask2Former) else Mask2Former.from_pretrained(checkpoint)
    model = model.eval().float()
    out.parent.mkdir(parents=True, exist_ok=True)
    divisor = max(model.config.size_divisibility, 1)
    with tempfile.TemporaryDirectory() as directory:
        onnx_path = Path(directory) / f"{out.stem}.onnx"
        # Not checked here: the IR it becomes is checked below, on OpenVINO.
        report = export_onnx(model, onnx_path, height=height, width=width, runtime="openvino", check=False)
        start = time.perf_counter()
        # compress_to_fp16=False: save_model would otherwise store fp16 weights (a precision nobody asked for).
        openvino.save_model(openvino.Core().read_model(str(onnx_path)), str(out), compress_to_fp16=False)
        sidecar_path(out).write_text(sidecar_path(onnx_path).read_text())
    report = {"openvino": str(out), "weights": str(out.with_suffix(".bin")), "traced_size": [height, width],
              "dynamic_axes": report["dynamic_axes"], "export_seconds": report["export_seconds"],
              "convert_seconds": round(time.perf_counter() - start, 2), "checked_on": "openvino"}
    runner = load_exported(out, "openvino")
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch_size, 3, h, w, generator=generator)
              for batch_size, h, w in check_sizes or default_check_sizes(height, width, divisor)]
    report["checked_precision"] = runner.precision
    report["checks"] = compare_with_pytorch(model, runner, inputs)
    report["max_abs_diff_masks"] = max(check["max_abs_diff_masks"] for check in report["checks"])
    report["max_abs_diff_logits"] = max(check["max_abs_diff_logits"] for check in report["checks"])
    if quantize == "int8":
        images = calibration_images(calibration_count + HELD_OUT_IMAGES, calibration_dir, min(height, width))
        quantized = out.with_name(f"{out.stem}.int8.xml")
        start = time.perf_counter()
        quantize_openvino(out, quantized, images[:calibration_count])
        int8 = load_exported(quantized, "openvino")
        report["int8"] = {
            "openvino": str(quantized), "quantize_seconds": round(time.perf_counter() - start, 2),
            "tool": "nncf.quantize", "model_type": MODEL_TYPE, "calibration_images": calibration_count,
            "calibration_source": str(calibration_dir) if calibration_dir else "FashionScenes train split",
            "precision": int8.precision, "checks": [],
        }
        held_out = [torch.from_numpy(normalised(runner, image)) for image in images[calibration_count:]]
        for label, batch in [("held-out image", x) for x in held_out] + [("random", x) for x in inputs]:
            report["int8"]["checks"].append({"input": list(batch.shape), "kind": label,
                                             **mask_agreement(runner(batch), int8(batch))})
    return report
