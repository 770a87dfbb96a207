"""Deployment table: PyTorch fp32, PyTorch bf16 autocast, onnxruntime fp32 and onnxruntime int8 (dynamic
quantisation, ``mask2former export --quantize int8``), OpenVINO f32, OpenVINO bf16 (only where the CPU runs it
natively: avx512_bf16 / amx_bf16; elsewhere OpenVINO would run f32 and the column is left out, with the reason in the
JSON) and OpenVINO int8 (NNCF post-training quantisation, ``export --format openvino --quantize int8``, calibrated
on ``--calibration-images`` FashionScenes *train* images) on the CPU, side by side in one process.

- Default model (``--checkpoint``, the trained FashionScenes model): PQ / AP / mIoU on ``--num-val`` FashionScenes val
  images through ``evaluation.evaluate_model`` (the same Predictor and metric code as ``mask2former evaluate``), and
  the latency of one 1x3x256x256 forward.
- Swin-T Mask2Former at 1x3x512x512 (the model of ``forward_vs_transformers.py``: transformers' Swin-T config with
  informative random weights, loaded into ours): latency, and mask-sign agreement with PyTorch fp32.

Both ONNX files are one dynamic-size export each (traced at the benchmark size); the export report (max |diff| to
PyTorch at three other sizes) is included. OpenVINO reads that ONNX file itself. Timings are interleaved (one run of
every variant per round) and the median of ``--repeats`` rounds after ``--warmup`` is reported; PyTorch,
onnxruntime and OpenVINO all get ``--threads`` intra-op threads. The JSON records the CPU model and the lscpu flags
that decide bf16/int8 speed (AVX-512, AMX, VNNI). Run under ``flock /tmp/bench.lock`` on a shared machine.

    python benchmarks/deploy.py [--checkpoint runs/fashion_scenes/model_final] [--threads 2] [--repeats 40]
        [--calibration-images 300] [--swin-calibration-images 50] [--skip-openvino]

Writes benchmarks/results/deploy.json and the markdown table to deploy.md (and prints it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "deploy.json"
VARIANTS = ("pytorch_fp32", "pytorch_bf16", "onnxruntime_fp32", "onnxruntime_int8", "openvino_fp32", "openvino_bf16",
            "openvino_int8")


def make_runners(model, paths: dict, threads: int) -> dict:
    """Callables for every variant that runs here (``_models``: the exported-model objects, ``_skipped``: why a
    variant does not run)."""
    from mask2former.inference.runtimes import load_exported

    exported = {"onnxruntime_fp32": load_exported(paths["onnx"], "onnxruntime", threads=threads),
                "onnxruntime_int8": load_exported(paths["onnx_int8"], "onnxruntime", threads=threads)}
    skipped = {}
    if "openvino_int8" in paths:
        exported["openvino_fp32"] = load_exported(paths["onnx"], "openvino", "fp32", threads=threads)
        bf16 = load_exported(paths["onnx"], "openvino", "bf16", threads=threads)
        if bf16.precision == "bf16":
            exported["openvino_bf16"] = bf16
        else:
            skipped["openvino_bf16"] = f"bf16 requested, OpenVINO runs {bf16.precision}: no native bf16 on this CPU"
        exported["openvino_int8"] = load_exported(paths["openvino_int8"], "openvino", "fp32", threads=threads)

    def pytorch(images, bf16: bool):
        context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), context:
            return model(images, aux_outputs=False)

    from mask2former.modeling.precision import native_bf16

    ours = {"pytorch_fp32": lambda images: pytorch(images, False)}
    if native_bf16(torch.device("cpu")):
        ours["pytorch_bf16"] = lambda images: pytorch(images, True)
    else:
        skipped["pytorch_bf16"] = "no native bf16 on this CPU (emulated bf16 is ~100x slower than fp32)"
    return {
        **ours,
        **exported,
        "_models": exported,
        "_skipped": skipped,
        "_ran": {name: f"{model.runtime} {model.precision}" for name, model in exported.items()},
    }


def variants(runners: dict) -> list[str]:
    return [name for name in VARIANTS if name in runners]


def interleaved_latency(runners: dict, images: torch.Tensor, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        for name in variants(runners):
            runners[name](images)
    times = {name: [] for name in variants(runners)}
    for _ in range(repeats):
        for name in variants(runners):
            start = time.perf_counter()
            runners[name](images)
            times[name].append(time.perf_counter() - start)
    return {
        "seconds_median": {name: round(statistics.median(values), 4) for name, values in times.items()},
        "seconds_min": {name: round(min(values), 4) for name, values in times.items()},
        "ratio_over_pytorch_fp32": {
            name: round(statistics.median(values) / statistics.median(times["pytorch_fp32"]), 3)
            for name, values in times.items()},
    }


def sign_agreement(runners: dict, images: torch.Tensor) -> dict:
    reference = runners["pytorch_fp32"](images).pred_masks.float()
    result = {}
    for name in variants(runners)[1:]:
        masks = runners[name](images).pred_masks.float()
        result[name] = {"mask_sign_agreement": round(((masks > 0) == (reference > 0)).float().mean().item(), 5),
                        "max_abs_diff_masks": round((masks - reference).abs().max().item(), 6)}
    return result


def export_all(model, directory: Path, size: int, calibration: int | None) -> tuple[dict, dict]:
    """The ONNX file (+ onnxruntime int8) and, unless ``calibration`` is None, the NNCF int8 IR calibrated on that
    many FashionScenes train images (shortest edge resized to ``size``)."""
    from mask2former.apps.onnx import export_onnx

    paths = {"onnx": directory / "model.onnx", "onnx_int8": directory / "model.int8.onnx"}
    report = export_onnx(model, paths["onnx"], height=size, width=size, quantize="int8")
    if calibration:
        from mask2former.apps.openvino_export import calibration_images, quantize_openvino
        from mask2former.inference.predictor import resize_shortest_edge

        images = [resize_shortest_edge(image, size, None) for image in calibration_images(calibration)]
        start = time.perf_counter()
        paths["openvino_int8"] = quantize_openvino(paths["onnx"], directory / "model.openvino.int8.xml", images)
        report["openvino_int8"] = {"calibration_images": calibration, "source": "FashionScenes train",
                                   "quantize_seconds": round(time.perf_counter() - start, 1)}
    return paths, report


def default_model_part(args, directory: Path) -> dict:
    from mask2former.config import load_config
    from mask2former.data.build import build_dataset
    from mask2former.evaluation.evaluator import evaluate_model
    from mask2former.modeling.model import Mask2Former

    model = Mask2Former.from_pretrained(args.checkpoint).eval()
    config = load_config("fashion_scenes_lite0", [f"data.num_val_images={args.num_val}"])
    paths, export_report = export_all(model, directory, 256, None if args.skip_openvino else args.calibration_images)
    runners = make_runners(model, paths, args.threads)
    dataset, label_space = build_dataset(config, split=config.data.val_split, train=False)
    accuracy = {}
    for name in variants(runners) if args.num_val > 0 else []:  # --num-val 0: latency only
        evaluated = runners["_models"].get(name, model)
        precision = "bf16" if name == "pytorch_bf16" else "fp32"
        result = evaluate_model(
            evaluated, dataset, label_space, precision=precision, batch_size=4,
            object_mask_threshold=config.test.object_mask_threshold, overlap_threshold=config.test.overlap_threshold,
            top_k=config.test.top_k, semantic_postprocess_before_inference=config.test.semantic_before_inference(),
        )
        metrics = result["metrics"]
        accuracy[name] = {key: round(metrics[key], 2) for key in ("PQ", "AP", "mIoU") if key in metrics}
        accuracy[name]["eval_seconds"] = round(result["seconds"], 1)
        print(f"  {name}: {accuracy[name]}", flush=True)
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    return {
        "model": f"{args.checkpoint} (EfficientNet-Lite0, FashionScenes), input 1x3x256x256",
        "export": export_report,
        "ran": runners["_ran"],
        "skipped": runners["_skipped"],
        "accuracy": accuracy,
        "num_val_images": len(dataset),
        "agreement_with_pytorch_fp32": sign_agreement(runners, images),
        "latency": interleaved_latency(runners, images, args.repeats, args.warmup),
    }


def swin_part(args, directory: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from forward_vs_transformers import build_transformers_model

    from mask2former.modeling.model import Mask2Former

    theirs = build_transformers_model(133)
    with tempfile.TemporaryDirectory() as weights:
        theirs.save_pretrained(weights)
        model = Mask2Former.from_pretrained(weights).eval()
    del theirs
    model.requires_grad_(False)
    paths, export_report = export_all(model, directory, 512,
                                      None if args.skip_openvino else args.swin_calibration_images)
    runners = make_runners(model, paths, args.threads)
    images = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    return {
        "model": "Mask2Former Swin-T (forward_vs_transformers.py's model), 100 queries, 133 classes, 1x3x512x512",
        "export": export_report,
        "ran": runners["_ran"],
        "skipped": runners["_skipped"],
        "agreement_with_pytorch_fp32": sign_agreement(runners, images),
        "latency": interleaved_latency(runners, images, args.swin_repeats, 1),
    }


def markdown(result: dict) -> str:
    default, swin = result.get("default_model"), result.get("swin_tiny")
    lines = ["| model | variant | latency (median) | vs PyTorch fp32 | PQ | AP | mIoU | mask-sign agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for label, part in (("default 256²", default), ("Swin-T 512²", swin)):
        if part is None:
            continue
        latency = part["latency"]
        for name in [name for name in VARIANTS if name in latency["seconds_median"]]:
            accuracy = part.get("accuracy", {}).get(name, {})
            agreement = part["agreement_with_pytorch_fp32"].get(name, {}).get("mask_sign_agreement", 1.0)
            lines.append(
                f"| {label} | {name} | {latency['seconds_median'][name] * 1000:.0f} ms | "
                f"{latency['ratio_over_pytorch_fp32'][name]:.2f}x | {accuracy.get('PQ', '-')} | {accuracy.get('AP', '-')} | "
                f"{accuracy.get('mIoU', '-')} | {agreement * 100:.3f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/fashion_scenes/model_final")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--swin-repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--skip-swin", action="store_true")
    parser.add_argument("--skip-openvino", action="store_true", help="leave out the OpenVINO columns")
    parser.add_argument("--calibration-images", type=int, default=300,
                        help="FashionScenes train images calibrating NNCF int8 for the default model")
    parser.add_argument("--swin-calibration-images", type=int, default=50,
                        help="the same for Swin-T (512², slower to calibrate; its weights are random anyway)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import onnxruntime

    from mask2former.allocator import tune_malloc

    torch.set_num_threads(args.threads)
    malloc_tuned = tune_malloc()
    sys.path.insert(0, str(HERE))
    from machine import machine_info

    result = {
        "threads": args.threads, "repeats": args.repeats, "swin_repeats": args.swin_repeats, "warmup": args.warmup,
        "malloc_tuning": malloc_tuned, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "openvino": None, "nncf": None,
        "cpu": platform.processor() or platform.machine(), **machine_info(), "loadavg_before": os.getloadavg(),
    }
    if not args.skip_openvino:
        import nncf
        import openvino

        result["openvino"], result["nncf"] = openvino.get_version(), nncf.__version__
    with tempfile.TemporaryDirectory() as directory:
        print("default model ...", flush=True)
        (Path(directory) / "default").mkdir()
        result["default_model"] = default_model_part(args, Path(directory) / "default")
        if not args.skip_swin:
            print("Swin-T ...", flush=True)
            (Path(directory) / "swin").mkdir()
            result["swin_tiny"] = swin_part(args, Path(directory) / "swin")
    result["loadavg_after"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.output.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
