"""Our forward vs transformers' ``Mask2FormerForUniversalSegmentation`` forward on the same weights (CPU).

Swin-T Mask2Former (embed 96, depths 2,2,6,2, heads 3,6,12,24, window 7; 100 queries, 133 classes, 9 decoder
layers), one 3x512x512 image, ``torch.set_num_threads(threads)``, eval mode, ``torch.inference_mode``. No pretrained
Mask2Former weights exist offline, so transformers' model is randomly initialised at unit scale (its own init gives
near-constant outputs), saved with ``save_pretrained`` and loaded into ours with ``Mask2Former.from_pretrained``.

Timings are interleaved in one process (ours fp32, theirs fp32, ours bf16, theirs bf16, repeat) and the median of
``--repeats`` runs after ``--warmup`` runs each is reported; bf16 = ``torch.autocast("cpu", dtype=torch.bfloat16)``.
Also reported: max |ours - theirs| in fp32, the share of mask-logit entries whose sign agrees with our fp32
output (our bf16 and their bf16), FLOPs (``torch.utils.flop_counter``; ``grid_sample`` is not counted), a per-stage
split of our time, and the top operators of one profiled forward of ours.

    python benchmarks/forward_vs_transformers.py [--threads 2] [--repeats 7] [--size 512]

Writes benchmarks/results/forward_vs_transformers.json.
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

RESULTS = Path(__file__).resolve().parent / "results" / "forward_vs_transformers.json"


def build_transformers_model(num_classes: int, seed: int = 0):
    import transformers

    swin = transformers.SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, num_queries=100, decoder_layers=10,
        id2label={i: f"class_{i}" for i in range(num_classes)},
    )
    from mask2former.interop.random_weights import informative_transformers_mask2former

    torch.manual_seed(seed)
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    return informative_transformers_mask2former(model, seed)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    # The math backend decomposes scaled_dot_product_attention into counted matmuls (the fused CPU kernel,
    # aten::_scaled_dot_product_flash_attention_for_cpu, has no FLOP formula and would count as zero).
    with counter, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        fn()
    return counter.get_total_flops()


def time_call(fn, autocast: bool) -> float:
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), context:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc malloc at its defaults (the CLI tunes it; see mask2former.allocator)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=133)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()

    import transformers

    from mask2former.modeling.model import Mask2Former

    torch.set_num_threads(args.threads)
    from mask2former.allocator import tune_malloc

    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()  # process-wide: applies to both libraries
    load_before = os.getloadavg()
    theirs = build_transformers_model(args.num_classes)
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = Mask2Former.from_pretrained(directory).eval()
    # Inference only (and FlopCounterMode's module tracker wants no parameter that requires grad under no_grad).
    ours.requires_grad_(False)
    theirs.requires_grad_(False)
    images = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))

    def run_ours():
        return ours(images)

    def run_ours_inference():
        # What Predictor / ONNX run: only the final prediction (transformers has no such path).
        return ours(images, aux_outputs=False)

    def run_theirs():
        return theirs(pixel_values=images, output_auxiliary_logits=True)

    # Accuracy: fp32 agreement, and how bf16 moves the mask-logit signs relative to our fp32 output.
    with torch.inference_mode():
        ours_fp32, theirs_fp32 = run_ours(), run_theirs()
        ours_inference_fp32 = run_ours_inference()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours_bf16, theirs_bf16 = run_ours(), run_theirs()
            ours_inference_bf16 = run_ours_inference()
    reference_masks = ours_fp32.pred_masks
    max_diff_masks = (reference_masks - theirs_fp32.masks_queries_logits).abs().max().item()
    max_diff_logits = (ours_fp32.pred_logits - theirs_fp32.class_queries_logits).abs().max().item()
    max_diff_aux = max(
        max((a["pred_masks"] - b["masks_queries_logits"]).abs().max().item(),
            (a["pred_logits"] - b["class_queries_logits"]).abs().max().item())
        for a, b in zip(ours_fp32.aux_outputs, theirs_fp32.auxiliary_logits)
    )

    def sign_agreement(masks):
        return ((masks.float() > 0) == (reference_masks > 0)).float().mean().item()

    flops_ours = count_flops(run_ours)
    flops_theirs = count_flops(run_theirs)

    # Interleaved timing.
    variants = {
        "ours_fp32": (run_ours, False), "transformers_fp32": (run_theirs, False),
        "ours_bf16": (run_ours, True), "transformers_bf16": (run_theirs, True),
        "ours_inference_fp32": (run_ours_inference, False), "ours_inference_bf16": (run_ours_inference, True),
    }
    for _ in range(args.warmup):
        for fn, autocast in variants.values():
            time_call(fn, autocast)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (fn, autocast) in variants.items():
            times[name].append(time_call(fn, autocast))
    median = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}

    # Where our time goes: per stage (median of 3) and the top operators of one profiled forward.
    def stage_times():
        with torch.inference_mode():
            start = time.perf_counter()
            features = ours.backbone(images)
            backbone_end = time.perf_counter()
            mask_features, multi_scale = ours.pixel_decoder(features)
            pixel_end = time.perf_counter()
            ours.transformer_decoder(multi_scale, mask_features)
            end = time.perf_counter()
        return {"backbone": backbone_end - start, "pixel_decoder": pixel_end - backbone_end,
                "transformer_decoder": end - pixel_end}

    stage_runs = [stage_times() for _ in range(3)]
    stages = {key: round(statistics.median(run[key] for run in stage_runs), 4) for key in stage_runs[0]}
    top_ops = []
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            run_ours()
        averages = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
        total = sum(event.self_cpu_time_total for event in averages) or 1
        for event in averages[:15]:
            top_ops.append({"op": event.key, "self_ms": round(event.self_cpu_time_total / 1000, 2),
                            "share": round(event.self_cpu_time_total / total, 3), "calls": event.count})

    result = {
        "model": "Mask2Former Swin-T (embed 96, depths 2,2,6,2, window 7), 100 queries, "
                 f"{args.num_classes} classes, 9 decoder layers; random unit-scale weights",
        "input": [1, 3, args.size, args.size],
        "threads": args.threads,
        "malloc_tuning": malloc_tuned,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seconds_median": {name: round(value, 4) for name, value in median.items()},
        "seconds_all": {name: [round(v, 4) for v in values] for name, values in times.items()},
        "ratio_ours_over_transformers_fp32": round(median["ours_fp32"] / median["transformers_fp32"], 3),
        "ratio_ours_bf16_over_transformers_fp32": round(median["ours_bf16"] / median["transformers_fp32"], 3),
        "ratio_ours_inference_over_transformers_fp32":
            round(median["ours_inference_fp32"] / median["transformers_fp32"], 3),
        "ratio_ours_inference_bf16_over_transformers_fp32":
            round(median["ours_inference_bf16"] / median["transformers_fp32"], 3),
        "ratio_transformers_bf16_over_transformers_fp32":
            round(median["transformers_bf16"] / median["transformers_fp32"], 3),
        # On a shared machine the minimum is the least disturbed run; its ratios are a cross-check of the medians.
        "seconds_min": {name: round(value, 4) for name, value in fastest.items()},
        "ratio_of_minimums_ours_over_transformers_fp32": round(fastest["ours_fp32"] / fastest["transformers_fp32"], 3),
        "ratio_of_minimums_ours_bf16_over_transformers_fp32":
            round(fastest["ours_bf16"] / fastest["transformers_fp32"], 3),
        "max_abs_diff_fp32": {"pred_masks": max_diff_masks, "pred_logits": max_diff_logits, "aux": max_diff_aux},
        "mask_sign_agreement_with_ours_fp32": {
            "ours_bf16": round(sign_agreement(ours_bf16.pred_masks), 5),
            "ours_inference_fp32": round(sign_agreement(ours_inference_fp32.pred_masks), 5),
            "ours_inference_bf16": round(sign_agreement(ours_inference_bf16.pred_masks), 5),
            "transformers_bf16": round(sign_agreement(theirs_bf16.masks_queries_logits), 5),
            "transformers_fp32": round(sign_agreement(theirs_fp32.masks_queries_logits), 5),
        },
        "gflops": {"ours": round(flops_ours / 1e9, 2), "transformers": round(flops_theirs / 1e9, 2),
                   "note": "torch.utils.flop_counter, attention counted through the math SDPA backend; "
                           "grid_sample, softmax, norms and elementwise ops are not counted"},
        "ours_stage_seconds_fp32": stages,
        "ours_top_ops_fp32": top_ops,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": sys.version.split()[0]},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key not in ("seconds_all", "ours_top_ops_fp32")},
                     indent=2))
    for op in top_ops:
        print(f"{op['self_ms']:10.1f} ms {op['share']:6.1%} {op['calls']:6d}  {op['op']}")


if __name__ == "__main__":
    main()
