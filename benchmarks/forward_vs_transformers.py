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

bf16 inference (issue 18): our inference forward (``aux_outputs=False``) under bf16 autocast with and without each
speed technique (``INFERENCE_VARIANTS``; ``--compile`` adds torch.compile'd forwards and their compile time), each
timed in the same interleaved loop, with its ratio to transformers' fp32 time, its mask-sign agreement with our fp32
output, its distance to the GEMM roof (FLOPs of the inference forward / this machine's square bf16 matmul rate,
measured here), and a profile breakdown (self CPU time per stage and per operator class).

    python benchmarks/forward_vs_transformers.py [--threads 2] [--repeats 7] [--size 512] [--compile]

Writes benchmarks/results/forward_vs_transformers.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "forward_vs_transformers.json"
# The random unit-scale weights are a test helper (tests/random_inputs.py), shared with the parity tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


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
    from random_inputs import informative_transformers_mask2former

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


# Operator classes of the profile breakdown (regular expressions; the first class that matches takes the operator).
OP_CLASSES = (
    ("gemm", r"addmm|^aten::(mm|bmm|baddbmm|matmul|linear|einsum|conv\w*|_convolution|_linear_pointwise)$"
             r"|mkldnn|onednn"),
    ("attention", r"scaled_dot_product|flash_attention"),
    ("softmax", r"softmax"),
    ("norm", r"layer_norm|group_norm"),
    ("msda_sampling", r"grid_sampler|mask2former::msda"),
    ("copies_casts", r"copy|^aten::(to|clone|contiguous|cat|roll|constant_pad_nd|pad|stack|index|empty\w*|reshape|view"
                     r"|_unsafe_view|permute|transpose|expand|split\w*|unbind|chunk|flatten|unflatten|slice|select"
                     r"|unsqueeze|squeeze|t|upsample\w*|as_strided|alias|detach|narrow|lift_fresh|resolve_\w+)$"),
    ("elementwise", r"^aten::(add|mul|div|sub|rsub|gelu|relu|sigmoid|lt|gt|ne|eq|ge|le|sin|cos|pow|fill|zero|zeros"
                    r"|ones|where|masked_fill|bitwise_\w+|logical_\w+|all|any|sum|arange|meshgrid|max|floor|neg"
                    r"|floor_divide|clamp|exp|reciprocal|sqrt|rsqrt|erf)_?$"),
    ("compiled_fused", r"cpp_fused|Torch-Compiled|CompiledFxGraph|compiled"),
)
STAGES = ("backbone", "pixel_decoder", "transformer_decoder")


def op_class(name: str) -> str:
    for label, pattern in OP_CLASSES:
        if re.search(pattern, name):
            return label
    if name.startswith("stage::"):
        return "python_overhead"  # time in the stage range outside any operator
    return "other"


def profile_breakdown(model, fn, autocast: bool) -> dict:
    """One profiled forward: self CPU time per stage x operator class (ms), and the top operators."""
    from torch.profiler import ProfilerActivity, profile, record_function

    ranges, handles = {}, []
    for stage in STAGES:
        module = getattr(model, stage)

        def enter(_module, _inputs, stage=stage):
            ranges[stage] = record_function(f"stage::{stage}")
            ranges[stage].__enter__()

        def leave(_module, _inputs, _output, stage=stage):
            ranges.pop(stage).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with torch.inference_mode(), context, profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            wall = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    table: dict[str, dict[str, float]] = {stage: {} for stage in (*STAGES, "outside")}
    others: dict[str, float] = {}
    for event in prof.events():
        stage, parent = "outside", event
        while parent is not None:
            if parent.name.startswith("stage::"):
                stage = parent.name[len("stage::"):]
                break
            parent = parent.cpu_parent
        label = op_class(event.name)
        milliseconds = event.self_cpu_time_total / 1000
        table[stage][label] = table[stage].get(label, 0.0) + milliseconds
        if label == "other":
            others[event.name] = others.get(event.name, 0.0) + milliseconds
    per_stage = {stage: round(sum(row.values()), 1) for stage, row in table.items()}
    per_class: dict[str, float] = {}
    for row in table.values():
        for label, value in row.items():
            per_class[label] = per_class.get(label, 0.0) + value
    averages = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(per_stage.values()) or 1
    return {
        "wall_seconds_profiled": round(wall, 4),
        "self_ms_per_stage": per_stage,
        "self_ms_per_class": {k: round(v, 1) for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])},
        "share_per_class": {k: round(v / total, 3) for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])},
        "self_ms_stage_x_class": {stage: {k: round(v, 1) for k, v in sorted(row.items(), key=lambda kv: -kv[1])}
                                  for stage, row in table.items() if row},
        "unclassified_ops_ms": {k: round(v, 2) for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:8]},
        "top_ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 2), "calls": e.count,
                     "class": op_class(e.key)} for e in averages[:20]],
    }


def gemm_roof(size: int = 2048, repeats: int = 5) -> dict:
    """Achieved GFLOP/s of a square ``size`` matmul in fp32 and bf16 (this machine's GEMM roof), and of two of the
    model's own GEMM shapes in bf16 (Swin-T stage-1 fc1 at 512^2, the pixel decoder's FFN at 512^2)."""
    shapes = {"square": (size, size, size), "swin_stage1_fc1": (128 * 128, 96, 384),
              "pixel_decoder_ffn1": (5376, 256, 1024)}
    result = {}
    for name, (m, k, n) in shapes.items():
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name != "square" and label == "fp32":
                continue
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            for _ in range(2):
                a @ b
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - start)
            result[f"{name}_{label}_gflops"] = round(2 * m * k * n / best / 1e9, 1)
    return result


def time_call(fn, autocast: bool) -> float:
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), context:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


# bf16 inference forwards (aux_outputs=False, bf16 autocast), each a combination of the techniques:
# pixel_decoder_fp32 (the reference keeps the pixel decoder in fp32), bf16_msda (the C kernel reads bf16 values),
# nchw_features (undo the channels-last Swin features: NCHW copies as before), bf16_weights (weights cast once).
INFERENCE_VARIANTS = {
    "inference_bf16_pd32_fp32_msda_nchw": dict(pixel_decoder_fp32=True, bf16_msda=False, nchw_features=True),
    "inference_bf16_pd32_bf16_weights": dict(pixel_decoder_fp32=True, bf16_weights=True),
    "inference_bf16_pd16_fp32_msda_nchw": dict(pixel_decoder_fp32=False, bf16_msda=False, nchw_features=True),
    "inference_bf16_pd16_fp32_msda": dict(pixel_decoder_fp32=False, bf16_msda=False),
    "inference_bf16_pd16_nchw": dict(pixel_decoder_fp32=False, nchw_features=True),
    "inference_bf16_pd16": dict(pixel_decoder_fp32=False),
    "inference_bf16_pd16_bf16_weights": dict(pixel_decoder_fp32=False, bf16_weights=True),
}


def inference_variant(model, images, pixel_decoder_fp32: bool, bf16_msda: bool = True, nchw_features: bool = False):
    """Our inference forward with one combination of the techniques (autocast is applied by ``time_call``)."""
    from mask2former.modeling.kernels import cpu_ms_deform_attn

    def run():
        previous = model.pixel_decoder.fp32, cpu_ms_deform_attn.BF16_FORWARD
        model.pixel_decoder.fp32, cpu_ms_deform_attn.BF16_FORWARD = pixel_decoder_fp32, bf16_msda
        hook = None
        if nchw_features:
            hook = model.backbone.register_forward_hook(lambda _m, _i, out: [f.contiguous() for f in out])
        try:
            return model(images, aux_outputs=False)
        finally:
            model.pixel_decoder.fp32, cpu_ms_deform_attn.BF16_FORWARD = previous
            if hook is not None:
                hook.remove()

    return run


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
    parser.add_argument("--compile", action="store_true",
                        help="also time a torch.compile'd (inductor, freezing) bf16 inference forward and its "
                             "compile time")
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
    flops_inference = count_flops(run_ours_inference)

    # bf16 inference forwards with and without each technique (see INFERENCE_VARIANTS): pixel decoder in fp32
    # (model.pixel_decoder_fp32, the reference) or bf16; bf16 deformable-attention kernel; channels-last Swin
    # features into the pixel decoder's convolutions; weights cast to bf16 once; torch.compile.
    from mask2former.modeling.bf16_inference import cast_weights_for_bf16_autocast

    bf16_weight_models = {}
    for pixel_decoder_fp32 in (True, False):
        copy_ = copy.deepcopy(ours)
        copy_.pixel_decoder.fp32 = pixel_decoder_fp32
        bf16_weight_models[pixel_decoder_fp32] = cast_weights_for_bf16_autocast(copy_)
    inference_variants = {
        name: inference_variant(bf16_weight_models[spec["pixel_decoder_fp32"]] if spec.get("bf16_weights") else ours,
                                images, **{k: v for k, v in spec.items() if k != "bf16_weights"})
        for name, spec in INFERENCE_VARIANTS.items()
    }
    compile_seconds = {}
    if args.compile:
        # freezing: weights become constants, prepacked for oneDNN, their casts folded away.
        for pixel_decoder_fp32 in (False,):  # the fast setting only: each compile takes minutes on 2 cores
            name = f"inference_bf16_{'pd32' if pixel_decoder_fp32 else 'pd16'}_compiled"
            compiled = torch.compile(bf16_weight_models[pixel_decoder_fp32], options={"freezing": True})
            inference_variants[name] = inference_variant(compiled, images, pixel_decoder_fp32)
            compile_seconds[name] = round(time_call(inference_variants[name], True), 1)  # the first call compiles
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        variant_masks = {name: fn().pred_masks for name, fn in inference_variants.items()}

    # Interleaved timing.
    variants = {
        "ours_fp32": (run_ours, False), "transformers_fp32": (run_theirs, False),
        "ours_bf16": (run_ours, True), "transformers_bf16": (run_theirs, True),
        "ours_inference_fp32": (run_ours_inference, False), "ours_inference_bf16": (run_ours_inference, True),
        **{name: (fn, True) for name, fn in inference_variants.items()},
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
    breakdowns = {}
    if not args.no_profile:
        # Self CPU time per stage and operator class of one profiled bf16 inference forward (after one unprofiled).
        for name in ("ours_inference_bf16", "inference_bf16_pd16", "inference_bf16_pd16_bf16_weights"):
            model = bf16_weight_models[False] if name.endswith("bf16_weights") else ours
            fn = variants[name][0]
            time_call(fn, True)
            breakdowns[name] = profile_breakdown(model, fn, True)
    roof = gemm_roof()
    roof_seconds = flops_inference / (roof["square_bf16_gflops"] * 1e9)
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
        "bf16_inference": {
            "variants": {name: INFERENCE_VARIANTS.get(name, "torch.compile(mode default, inductor freezing) of the "
                                                            "bf16-weights model") for name in inference_variants},
            "seconds_median": {name: round(median[name], 4) for name in ("ours_inference_bf16", *inference_variants)},
            "ratio_over_transformers_fp32": {name: round(median[name] / median["transformers_fp32"], 3)
                                             for name in ("ours_inference_bf16", *inference_variants)},
            "mask_sign_agreement_with_ours_fp32": {name: round(sign_agreement(masks), 5)
                                                   for name, masks in variant_masks.items()},
            "compile_seconds_first_call": compile_seconds,
            "gflops_inference_path": round(flops_inference / 1e9, 2),
            "gemm_roof": roof,
            "roof_seconds_at_square_bf16_gemm_rate": round(roof_seconds, 4),
            "distance_to_roof": {name: round(median[name] / roof_seconds, 2)
                                 for name in ("ours_inference_bf16", *inference_variants)},
            "target": "<= 0.3x transformers' fp32 time with >= 99.5 % mask-sign agreement on a trained model "
                      "(benchmarks/bf16_agreement.py)",
            "profile_breakdown": breakdowns,
        },
        "ours_top_ops_fp32": top_ops,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": sys.version.split()[0]},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items()
                      if key not in ("seconds_all", "ours_top_ops_fp32", "bf16_inference")}, indent=2))
    print(json.dumps({key: value for key, value in result["bf16_inference"].items() if key != "profile_breakdown"},
                     indent=2))
    for name, breakdown in breakdowns.items():
        print(name, json.dumps({key: breakdown[key] for key in ("self_ms_per_stage", "self_ms_per_class")}))
    for op in top_ops:
        print(f"{op['self_ms']:10.1f} ms {op['share']:6.1%} {op['calls']:6d}  {op['op']}")


if __name__ == "__main__":
    main()
