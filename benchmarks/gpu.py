"""GPU benchmarks: the Triton MSDeformAttn kernel vs the grid_sample path, and end-to-end inference vs transformers.

(a) Kernel: the Mask2Former encoder's self-attention at a 1024x1024 input (levels 32², 64², 128², every token a
    query: Lq = S = 21504; 8 heads, 32 dims, 4 points), batch 1 and 8, fp32 and bf16. Locations are the encoder's
    reference points plus random offsets of a few pixels (as trained offsets are), weights a softmax. Forward, and
    forward + backward (all three gradients), each the median of ``--repeats`` CUDA-synchronised runs after
    ``--warmup``; peak memory of each; errors of the kernel against the grid_sample path in fp32 on the same inputs.
(b) End to end: images/s of ``Mask2Former`` at 1024x1024 vs transformers' ``Mask2FormerForUniversalSegmentation``,
    Swin-L (the coco_panoptic_swin_large preset: 200 queries, 133 classes) with the same random weights (theirs
    saved with ``save_pretrained`` and loaded into ours with ``from_pretrained``) and R50 (the coco_panoptic_r50
    preset; transformers' ResNet backbone cannot be loaded into ours, so their R50 model has its own random
    weights: a timing of the same architecture, not an output comparison). Batch 1 and 8, fp32 and
    ``torch.autocast("cuda", bfloat16)``, eval mode, ``torch.inference_mode``; ours also with the grid_sample
    path forced, to show what the kernel brings. PyTorch's default TF32 settings for both (matmul TF32 off,
    cuDNN convolutions TF32 on).

    python benchmarks/gpu.py [--repeats 10] [--warmup 3] [--skip-e2e] [--output benchmarks/results/gpu.json]

Writes the JSON and a markdown table next to it (``gpu.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
LEVELS = [(32, 32), (64, 64), (128, 128)]  # 1/32, 1/16, 1/8 of 1024, in the encoder's order


def cuda_time(fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median seconds of ``fn`` (each run synchronised) and all runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def peak_memory(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ----------------------------------------------------------------------------------------------- (a) kernel


def encoder_inputs(batch: int, dtype: torch.dtype, seed: int = 0):
    from mask2former.modeling.pixel_decoder import encoder_reference_points

    generator = torch.Generator(device="cuda").manual_seed(seed)
    heads, dim, points, levels = 8, 32, 4, len(LEVELS)
    tokens = sum(h * w for h, w in LEVELS)
    value = torch.randn(batch, tokens, heads, dim, device="cuda", generator=generator)
    reference = encoder_reference_points(LEVELS, levels, "cuda", torch.float32)  # [1, S, L, 2]
    offsets = 2.0 * torch.randn(batch, tokens, heads, levels, points, 2, device="cuda", generator=generator)
    normalizer = torch.tensor([[w, h] for h, w in LEVELS], device="cuda", dtype=torch.float32)
    locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    logits = torch.randn(batch, tokens, heads, levels * points, device="cuda", generator=generator)
    weights = logits.softmax(-1).view(batch, tokens, heads, levels, points)
    return [t.to(dtype) for t in (value, locations, weights)]


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def kernel_benchmark(args) -> dict:
    from mask2former.modeling.kernels.triton_ms_deform_attn import ms_deform_attn_triton
    from mask2former.modeling.ms_deform_attn import ms_deform_attn_core_pytorch

    implementations = {"triton": ms_deform_attn_triton, "grid_sample": ms_deform_attn_core_pytorch}
    rows = []
    for batch in (1, 8):
        for dtype in (torch.float32, torch.bfloat16):
            value, locations, weights = encoder_inputs(batch, dtype)
            leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
            grad = torch.randn(batch, value.shape[1], 256, device="cuda", dtype=dtype)
            row = {"batch": batch, "dtype": str(dtype).replace("torch.", "")}
            for name, fn in implementations.items():
                # Defaults bind this iteration's tensors (closures in a loop would see the last ones).
                def forward(fn=fn, value=value, locations=locations, weights=weights):
                    with torch.no_grad():
                        return fn(value, LEVELS, locations, weights)

                def forward_backward(fn=fn, leaves=leaves, grad=grad):
                    out = fn(leaves[0], LEVELS, leaves[1], leaves[2])
                    torch.autograd.grad(out, leaves, grad)

                row[f"{name}_forward_ms"] = 1e3 * cuda_time(forward, args.warmup, args.repeats)[0]
                row[f"{name}_forward_backward_ms"] = 1e3 * cuda_time(forward_backward, args.warmup, args.repeats)[0]
                row[f"{name}_forward_peak_mib"] = peak_memory(forward) / 2**20
                row[f"{name}_forward_backward_peak_mib"] = peak_memory(forward_backward) / 2**20
            row["speedup_forward"] = row["grid_sample_forward_ms"] / row["triton_forward_ms"]
            row["speedup_forward_backward"] = row["grid_sample_forward_backward_ms"] / row["triton_forward_backward_ms"]
            # Errors against the grid_sample path in fp32 on the same (rounded) inputs: output and all gradients.
            reference = [t.detach().float().requires_grad_() for t in (value, locations, weights)]
            ref_out = ms_deform_attn_core_pytorch(reference[0], LEVELS, reference[1], reference[2])
            ref_grads = torch.autograd.grad(ref_out, reference, grad.float())
            out = ms_deform_attn_triton(leaves[0], LEVELS, leaves[1], leaves[2])
            grads = torch.autograd.grad(out, leaves, grad)
            names = ("output", "grad_value", "grad_locations", "grad_weights")
            row["max_relative_error_vs_fp32_grid_sample"] = {
                name: relative_error(a, b) for name, a, b in zip(names, (out, *grads), (ref_out, *ref_grads))}
            # The location gradient jumps where a sample crosses a pixel centre; the two paths round the pixel
            # coordinate differently, so a rare sample takes the other one-sided derivative there.
            location_error = (grads[1].double() - ref_grads[1].double()).abs()
            row["grad_locations_share_above_1e-3_relative"] = (
                location_error > 1e-3 * ref_grads[1].double().abs().max()).double().mean().item()
            row["max_abs_error_vs_fp32_grid_sample"] = {
                name: (a.double() - b.double()).abs().max().item()
                for name, a, b in zip(names, (out, *grads), (ref_out, *ref_grads))}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del value, locations, weights, leaves, grad, reference, ref_out, ref_grads, out, grads
            torch.cuda.empty_cache()
    return {"shapes": {"levels": LEVELS, "queries": sum(h * w for h, w in LEVELS), "heads": 8, "head_dim": 32,
                       "points": 4}, "rows": rows}


def sweep_launch(args) -> dict:
    """Try a few tile sizes / warp counts at batch 8 fp32 and use the fastest for the rest of the run (forward and
    backward chosen separately; the module's defaults are what this sweep chose on an H100)."""
    from mask2former.modeling.kernels import triton_ms_deform_attn as kernel_module

    value, locations, weights = encoder_inputs(8, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    grad = torch.randn(8, value.shape[1], 256, device="cuda")
    results = {}
    for tile, warps in ((1024, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8)):
        kernel_module.TILE_ELEMENTS.update(forward=tile, backward=tile)
        kernel_module.NUM_WARPS.update(forward=warps, backward=warps)

        def forward():
            with torch.no_grad():
                kernel_module.ms_deform_attn_triton(value, LEVELS, locations, weights)

        def forward_backward():
            out = kernel_module.ms_deform_attn_triton(leaves[0], LEVELS, leaves[1], leaves[2])
            torch.autograd.grad(out, leaves, grad)

        fwd = cuda_time(forward, 2, 7)[0]
        both = cuda_time(forward_backward, 2, 7)[0]
        results[(tile, warps)] = (fwd, both - fwd)
        print(f"sweep tile {tile} warps {warps}: fwd {1e3 * fwd:.3f} ms fwd+bwd {1e3 * both:.3f} ms", flush=True)
    best_forward = min(results, key=lambda key: results[key][0])
    best_backward = min(results, key=lambda key: results[key][1])
    kernel_module.TILE_ELEMENTS.update(forward=best_forward[0], backward=best_backward[0])
    kernel_module.NUM_WARPS.update(forward=best_forward[1], backward=best_backward[1])
    print(f"sweep chose forward {best_forward}, backward {best_backward}", flush=True)
    return {"ms": {f"tile{t}_warps{w}": {"forward": 1e3 * f, "backward": 1e3 * b} for (t, w), (f, b) in results.items()},
            "chosen": {"tile_elements": dict(kernel_module.TILE_ELEMENTS), "num_warps": dict(kernel_module.NUM_WARPS)}}


# ----------------------------------------------------------------------------------------------- (b) end to end


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Unit-scale random weights (transformers' own init leaves near-constant outputs, which would hide
    differences between the two models)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                values = torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel())
            elif "norm" in name and name.endswith("weight"):
                values = 1 + 0.2 * torch.randn(param.shape, generator=generator)
            else:
                values = 0.2 * torch.randn(param.shape, generator=generator)
            param.copy_(values)


def build_transformers_model(backbone: str, num_queries: int, num_classes: int):
    import transformers

    if backbone == "swin_large":
        backbone_config = transformers.SwinConfig(
            embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12, drop_path_rate=0.3,
            out_features=["stage1", "stage2", "stage3", "stage4"])
    else:
        backbone_config = transformers.ResNetConfig(
            depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone_config, num_queries=num_queries, decoder_layers=10,
        id2label={i: f"class_{i}" for i in range(num_classes)})
    torch.manual_seed(0)
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()


def build_models(backbone: str):
    from mask2former.config import load_config
    from mask2former.modeling.model import Mask2Former

    preset = load_config(f"coco_panoptic_{backbone}").model
    theirs = build_transformers_model(backbone, preset.num_queries, preset.num_classes)
    if backbone == "swin_large":
        randomize_(theirs)
        with tempfile.TemporaryDirectory() as directory:
            theirs.save_pretrained(directory)
            ours = Mask2Former.from_pretrained(directory)
        same_weights = True
    else:
        # Each model with its own initialisation (timings only).
        preset.backbone.pretrained = False
        torch.manual_seed(0)
        ours = Mask2Former(preset)
        same_weights = False
    return ours.eval().cuda().requires_grad_(False), theirs.cuda().requires_grad_(False), same_weights


def end_to_end(args) -> dict:
    from mask2former.modeling.kernels import ms_deform_attn_backend

    results = {}
    for backbone in args.backbones:
        ours, theirs, same_weights = build_models(backbone)
        entry = {"same_weights": same_weights, "params_ours_m": sum(p.numel() for p in ours.parameters()) / 1e6,
                 "params_transformers_m": sum(p.numel() for p in theirs.parameters()) / 1e6, "runs": []}
        if same_weights:
            images = torch.randn(1, 3, args.size, args.size, device="cuda",
                                 generator=torch.Generator(device="cuda").manual_seed(1))
            with torch.inference_mode():
                mine, other = ours(images), theirs(pixel_values=images)
            entry["max_abs_diff_fp32"] = {
                "pred_masks": (mine.pred_masks - other.masks_queries_logits).abs().max().item(),
                "pred_logits": (mine.pred_logits - other.class_queries_logits).abs().max().item(),
                "pred_masks_scale": other.masks_queries_logits.abs().max().item()}
            print(backbone, entry["max_abs_diff_fp32"], flush=True)
        for batch in args.batches:
            images = torch.randn(batch, 3, args.size, args.size, device="cuda")
            for precision in ("fp32", "bf16"):
                autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16"
                            else contextlib.nullcontext())
                variants = {
                    "ours": (lambda ours=ours, images=images: ours(images), "auto"),
                    "ours_grid_sample": (lambda ours=ours, images=images: ours(images), "pytorch"),
                    "transformers": (lambda theirs=theirs, images=images: theirs(pixel_values=images), "auto"),
                }
                row = {"batch": batch, "precision": precision}
                for name, (fn, backend) in variants.items():
                    def run():
                        with torch.inference_mode(), autocast, ms_deform_attn_backend(backend):
                            fn()

                    seconds, _ = cuda_time(run, args.warmup, args.e2e_repeats)
                    row[f"{name}_images_per_s"] = batch / seconds
                    row[f"{name}_peak_mib"] = peak_memory(run) / 2**20
                    torch.cuda.empty_cache()
                row["speedup_vs_transformers"] = row["ours_images_per_s"] / row["transformers_images_per_s"]
                row["speedup_from_kernel"] = row["ours_images_per_s"] / row["ours_grid_sample_images_per_s"]
                entry["runs"].append(row)
                print(backbone, json.dumps(row), flush=True)
            del images
            torch.cuda.empty_cache()
        results[backbone] = entry
        del ours, theirs
        torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = [f"# GPU benchmarks ({result['machine']['gpu']})", "",
             f"torch {result['machine']['torch']}, triton {result['machine']['triton']}, transformers "
             f"{result['machine']['transformers']}; medians after warm-up, CUDA-synchronised. "
             "Produced by `python benchmarks/gpu.py`.", "",
             "## MSDeformAttn core at 1024x1024 encoder shapes (levels 32², 64², 128²; Lq = 21504; 8 heads, "
             "32 dims, 4 points)", "",
             "| batch | dtype | fwd grid_sample ms | fwd Triton ms | speedup | fwd+bwd grid_sample ms | "
             "fwd+bwd Triton ms | speedup | peak MiB fwd+bwd grid_sample / Triton |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["kernel"]["rows"]:
        lines.append(
            f"| {row['batch']} | {row['dtype']} | {row['grid_sample_forward_ms']:.3f} | {row['triton_forward_ms']:.3f}"
            f" | **{row['speedup_forward']:.1f}x** | {row['grid_sample_forward_backward_ms']:.3f} | "
            f"{row['triton_forward_backward_ms']:.3f} | **{row['speedup_forward_backward']:.1f}x** | "
            f"{row['grid_sample_forward_backward_peak_mib']:.0f} / {row['triton_forward_backward_peak_mib']:.0f} |")
    lines += ["", "Max error of the kernel relative to the largest entry, vs the fp32 grid_sample path on the same "
              "inputs (output / grad value / grad locations / grad weights):", ""]
    for row in result["kernel"]["rows"]:
        errors = row["max_relative_error_vs_fp32_grid_sample"]
        lines.append(f"- batch {row['batch']} {row['dtype']}: " + " / ".join(f"{v:.1e}" for v in errors.values()))
    if result.get("end_to_end"):
        lines += ["", f"## End-to-end inference, {result['input_size']}x{result['input_size']} images "
                  "(images/s; forward of the model only)", "",
                  "| model | batch | precision | ours | ours, grid_sample path | transformers | ours / transformers |",
                  "|---|---|---|---|---|---|---|"]
        for backbone, entry in result["end_to_end"].items():
            label = {"swin_large": "Swin-L, 200 queries", "r50": "R50, 100 queries"}[backbone]
            for row in entry["runs"]:
                lines.append(
                    f"| {label} | {row['batch']} | {row['precision']} | {row['ours_images_per_s']:.2f} | "
                    f"{row['ours_grid_sample_images_per_s']:.2f} | {row['transformers_images_per_s']:.2f} | "
                    f"**{row['speedup_vs_transformers']:.2f}x** |")
        lines += ["", "Swin-L: both models hold the same weights (fp32 max |Δ| of the mask logits: "
                  f"{result['end_to_end'].get('swin_large', {}).get('max_abs_diff_fp32', {}).get('pred_masks', 'n/a')}"
                  "). R50: transformers' ResNet backbone does not map onto ours (our interop reads Swin checkpoints "
                  "only), so its R50 model has other random weights; the timing compares the same architecture."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--e2e-repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--backbones", nargs="+", default=["r50", "swin_large"], choices=["r50", "swin_large"])
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernel's tile size and warp count")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU")
    import triton
    import transformers

    result = {"machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "triton": triton.__version__, "transformers": transformers.__version__,
                          "cuda": torch.version.cuda, "python": platform.python_version()},
              "input_size": args.size, "warmup": args.warmup, "repeats": args.repeats,
              "e2e_repeats": args.e2e_repeats}
    if args.sweep:
        result["launch_sweep"] = sweep_launch(args)
    result["kernel"] = kernel_benchmark(args)
    if not args.skip_e2e:
        result["end_to_end"] = end_to_end(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
