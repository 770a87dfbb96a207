"""Deployment table: PyTorch fp32, PyTorch bf16 autocast, onnxruntime fp32 and onnxruntime int8 (dynamic
quantisation, ``mask2former export --quantize int8``) on the CPU, side by side in one process.

- Default model (``--checkpoint``, the trained FashionScenes model): PQ / AP / mIoU on ``--num-val`` FashionScenes val
  images through ``evaluation.evaluate_model`` (the same Predictor and metric code as ``mask2former evaluate``), and
  the latency of one 1x3x256x256 forward.
- Swin-T Mask2Former at 1x3x512x512 (the model of ``forward_vs_transformers.py``: transformers' Swin-T config with
  informative random weights, loaded into ours): latency, and mask-sign agreement with PyTorch fp32.

Both ONNX files are one dynamic-size export each (traced at the benchmark size); the export report (max |diff| to
PyTorch at three other sizes) is included. Timings are interleaved (one run of every variant per round) and the
median of ``--repeats`` rounds after ``--warmup`` is reported; PyTorch and onnxruntime both get ``--threads``
intra-op threads. Run under ``flock /tmp/bench.lock`` on a shared machine.

    python benchmarks/deploy.py [--checkpoint runs/fashion_scenes/model_final] [--threads 2] [--repeats 40]

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
VARIANTS = ("pytorch_fp32", "pytorch_bf16", "onnxruntime_fp32", "onnxruntime_int8")


def make_runners(model, fp32_path: Path, int8_path: Path, threads: int) -> dict:
    from mask2former.apps.onnx import OnnxModel

    onnx_fp32 = OnnxModel(fp32_path, threads=threads)
    onnx_int8 = OnnxModel(int8_path, threads=threads)

    def pytorch(images, bf16: bool):
        context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), context:
            return model(images, aux_outputs=False)

    return {
        "pytorch_fp32": lambda images: pytorch(images, False),
        "pytorch_bf16": lambda images: pytorch(images, True),
        "onnxruntime_fp32": onnx_fp32,
        "onnxruntime_int8": onnx_int8,
        "_models": {"onnxruntime_fp32": onnx_fp32, "onnxruntime_int8": onnx_int8},
    }


def interleaved_latency(runners: dict, images: torch.Tensor, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        for name in VARIANTS:
            runners[name](images)
    times = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name in VARIANTS:
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
    for name in VARIANTS[1:]:
        masks = runners[name](images).pred_masks.float()
        result[name] = {"mask_sign_agreement": round(((masks > 0) == (reference > 0)).float().mean().item(), 5),
                        "max_abs_diff_masks": round((masks - reference).abs().max().item(), 6)}
    return result


def export_both(model, directory: Path, size: int) -> tuple[Path, Path, dict]:
    from mask2former.apps.onnx import export_onnx

    path = directory / "model.onnx"
    report = export_onnx(model, path, height=size, width=size, quantize="int8")
    return path, directory / "model.int8.onnx", report


def default_model_part(args, directory: Path) -> dict:
    from mask2former.config import load_config
    from mask2former.data.build import build_dataset
    from mask2former.evaluation.evaluator import evaluate_model
    from mask2former.modeling.model import Mask2Former

    model = Mask2Former.from_pretrained(args.checkpoint).eval()
    config = load_config("fashion_scenes_lite0", [f"data.num_val_images={args.num_val}"])
    fp32_path, int8_path, export_report = export_both(model, directory, 256)
    runners = make_runners(model, fp32_path, int8_path, args.threads)
    dataset, label_space = build_dataset(config, split=config.data.val_split, train=False)
    accuracy = {}
    for name in VARIANTS:
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
    fp32_path, int8_path, export_report = export_both(model, directory, 512)
    runners = make_runners(model, fp32_path, int8_path, args.threads)
    images = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    return {
        "model": "Mask2Former Swin-T (forward_vs_transformers.py's model), 100 queries, 133 classes, 1x3x512x512",
        "export": export_report,
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
        for name in VARIANTS:
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
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import onnxruntime

    from mask2former.allocator import tune_malloc

    torch.set_num_threads(args.threads)
    malloc_tuned = tune_malloc()
    result = {
        "threads": args.threads, "repeats": args.repeats, "swin_repeats": args.swin_repeats, "warmup": args.warmup,
        "malloc_tuning": malloc_tuned, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(), "loadavg_before": os.getloadavg(),
    }
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
