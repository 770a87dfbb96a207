"""Peak memory of the point-sampled mask loss (Mask2Former) vs the full-resolution loss (MaskFormer).

Forward + backward of the loss alone (matching included) on random predictions: Q queries,
`--layers` prediction sets (final + aux), ~`--targets` GT masks per image at `--image-size`
(predictions at 1/4). Each variant runs in a fresh subprocess:
- cuda: torch.cuda.max_memory_allocated above what was allocated before the loss;
- cpu: peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS before the loss
  (Linux only; glibc's mmap threshold is fixed so that freed buffers leave the RSS).
transformers' Mask2FormerLoss / MaskFormerLoss run the same way as peers when installed.

    python benchmarks/loss_memory.py [--device cpu|cuda] [--batch-size 1]

Results are merged into benchmarks/results/loss_memory.json under `<device>_<size>px_batch<B>`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("points", "full", "hf_points", "hf_full")
RESULTS = Path(__file__).resolve().parent / "results" / "loss_memory.json"


def make_inputs(args, device):
    generator = torch.Generator().manual_seed(0)
    size, mask_size = args.image_size, args.image_size // 4

    def prediction():
        logits = torch.randn(args.batch_size, args.queries, args.num_classes + 1, generator=generator)
        masks = 3 * torch.randn(args.batch_size, args.queries, mask_size, mask_size, generator=generator)
        return {"pred_logits": logits.to(device).requires_grad_(), "pred_masks": masks.to(device).requires_grad_()}

    predictions = [prediction() for _ in range(args.layers)]
    outputs = {**predictions[-1], "aux_outputs": predictions[:-1]}
    targets = []
    for _ in range(args.batch_size):
        # Random boxes covering 1/16..1/4 of each side: a mix of small and large segments.
        masks = torch.zeros(args.targets, size, size, dtype=torch.bool)
        for i in range(args.targets):
            top, left = torch.randint(0, size * 3 // 4, (2,), generator=generator).tolist()
            height, width = torch.randint(size // 16, size // 4, (2,), generator=generator).tolist()
            masks[i, top : top + height, left : left + width] = True
        labels = torch.randint(0, args.num_classes, (args.targets,), generator=generator)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return outputs, targets


def build_loss(variant, args):
    """A callable (outputs, targets) -> scalar total loss."""
    if variant in ("points", "full"):
        from mask2former.training.criterion import SetCriterion
        from mask2former.training.matcher import HungarianMatcher

        weights = (2.0, 5.0, 5.0) if variant == "points" else (1.0, 20.0, 1.0)
        matcher = HungarianMatcher(*weights, num_points=args.num_points, mask_cost=variant)
        criterion = SetCriterion(
            args.num_classes, matcher, *weights, num_points=args.num_points, mask_loss=variant
        )
        return lambda outputs, targets: SetCriterion.total_loss(criterion(outputs, targets))

    if variant == "hf_points":
        from transformers import Mask2FormerConfig
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

        config = Mask2FormerConfig(num_labels=args.num_classes, train_num_points=args.num_points)
        loss, weights = Mask2FormerLoss(config, weight_dict={}), (2.0, 5.0, 5.0)
    else:
        from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

        matcher = MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
        loss, weights = MaskFormerLoss(args.num_classes, matcher, weight_dict={}, eos_coef=0.1), (1.0, 20.0, 1.0)
    names = ("loss_cross_entropy", "loss_mask", "loss_dice")

    def total(outputs, targets):
        loss.to(outputs["pred_logits"].device)
        raw = loss(
            masks_queries_logits=outputs["pred_masks"],
            class_queries_logits=outputs["pred_logits"],
            mask_labels=[t["masks"].float() for t in targets],
            class_labels=[t["labels"] for t in targets],
            auxiliary_predictions=[
                {"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
                for a in outputs["aux_outputs"]
            ],
        )
        return sum(value * next(w for n, w in zip(names, weights) if key.startswith(n)) for key, value in raw.items())

    return total


def read_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def worker(args):
    device = torch.device(args.device)
    outputs, targets = make_inputs(args, device)
    run_loss = build_loss(args.worker, args)

    def step():
        torch.manual_seed(0)
        run_loss(outputs, targets).backward()

    step()  # warm-up: lazy initialisation (kernels, thread pools, caches) is not the loss's memory
    for prediction in [outputs, *outputs["aux_outputs"]]:
        prediction["pred_logits"].grad = prediction["pred_masks"].grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = read_status("VmRSS")
        reset_peak_rss()
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        peak = read_status("VmHWM") - before
    print(json.dumps({"peak_bytes": peak, "peak_mib": round(peak / 2**20, 1), "seconds": round(seconds, 3)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--layers", type=int, default=10, help="prediction sets: final + aux")
    parser.add_argument("--targets", type=int, default=20, help="GT masks per image")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=133)
    parser.add_argument("--num-points", type=int, default=12544)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    keys = ("batch_size", "queries", "layers", "targets", "image_size", "num_classes", "num_points")
    config = {k: getattr(args, k) for k in keys}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in config.items()] + [f"--device={args.device}"]
    results = {}
    for variant in args.variants:
        # A fixed glibc mmap threshold makes every large buffer its own mapping, returned to the OS
        # when freed, so RSS follows the live tensors (the default dynamic threshold keeps freed
        # warm-up buffers in the heap and hides later peaks).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(
            [sys.executable, __file__, f"--worker={variant}", *flags], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0:
            if variant.startswith("hf_") and "No module named 'transformers'" in proc.stderr:
                print(f"{variant}: skipped (transformers not installed)")
                continue
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{variant:10s} peak {results[variant]['peak_mib']:9.1f} MiB  ({results[variant]['seconds']:.2f} s)")

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    record = {
        "device": device_name,
        "torch": torch.__version__,
        "method": "cuda max_memory_allocated delta" if args.device.startswith("cuda") else "peak RSS (VmHWM) delta",
        "config": config,
        "variants": results,
    }
    ratios = (("full", "points", "ratio_full_over_points"), ("hf_full", "hf_points", "ratio_hf_full_over_hf_points"))
    for ours, theirs, name in ratios:
        if ours in results and theirs in results:
            record[name] = round(results[ours]["peak_bytes"] / max(results[theirs]["peak_bytes"], 1), 2)
            print(f"{name}: {record[name]}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(args.output.read_text()) if args.output.exists() else {}
    merged[f"{torch.device(args.device).type}_{args.image_size}px_batch{args.batch_size}"] = record
    args.output.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
