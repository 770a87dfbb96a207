"""How much bf16 autocast changes a *trained* model's output (CPU): mask-logit signs and panoptic quality.

The forward benchmark measures sign agreement on random unit-scale weights, where many mask logits sit near zero.
This script asks the same question of a trained checkpoint (e.g. ``runs/fashion_scenes/model_final`` from
``mask2former train``) on FashionScenes val images: the share of mask-logit entries whose sign under bf16 equals
fp32 (all queries, and the queries that survive panoptic post-processing: class score > 0.8), and PQ / AP / mIoU with
``precision`` fp32 vs bf16. The agreement is also given per bf16 speed technique (issue 18): the C deformable-attention
kernel reading fp32 vs bf16 values, weights cast to bf16 once (``modeling/bf16_inference.py``; must equal plain
autocast), and with ``--compile`` the torch.compile'd forward.

    python benchmarks/bf16_agreement.py --checkpoint runs/fashion_scenes/model_final [--images 100]

Writes benchmarks/results/bf16_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bf16_agreement.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a model directory (save_pretrained)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--pixel-decoder-fp32", choices=("checkpoint", "true", "false"), default="checkpoint",
                        help="pixel decoder in fp32 (the reference) or bf16 under autocast; default: as trained")
    parser.add_argument("--compile", action="store_true", help="also measure the torch.compile'd bf16 forward")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mask2former.data import FashionScenes
    from mask2former.evaluation.evaluator import evaluate_model
    from mask2former.modeling.model import Mask2Former

    from mask2former.modeling.bf16_inference import cast_weights_for_bf16_autocast
    from mask2former.modeling.kernels import cpu_ms_deform_attn

    model = Mask2Former.from_pretrained(args.checkpoint).eval().requires_grad_(False)
    if args.pixel_decoder_fp32 != "checkpoint" and hasattr(model.pixel_decoder, "fp32"):
        model.pixel_decoder.fp32 = args.pixel_decoder_fp32 == "true"
    dataset = FashionScenes("val", num_images=args.images)

    # The bf16 techniques of benchmarks/forward_vs_transformers.py, each measured against the fp32 output.
    def with_msda(enabled: bool, net):
        def run(images):
            previous, cpu_ms_deform_attn.BF16_FORWARD = cpu_ms_deform_attn.BF16_FORWARD, enabled
            try:
                return net(images, aux_outputs=False)
            finally:
                cpu_ms_deform_attn.BF16_FORWARD = previous
        return run

    import copy

    bf16_weights = cast_weights_for_bf16_autocast(copy.deepcopy(model))
    variants = {"bf16_fp32_msda_kernel": with_msda(False, model), "bf16": with_msda(True, model),
                "bf16_cast_weights": with_msda(True, bf16_weights)}
    compile_seconds = None
    if args.compile:
        variants["bf16_compiled"] = with_msda(True, torch.compile(bf16_weights, options={"freezing": True}))
    counts = {name: dict(agree_all=0, total_all=0, agree_kept=0, total_kept=0) for name in variants}
    max_diff_cast_weights = 0.0
    with torch.inference_mode():
        for index in range(len(dataset)):
            image = dataset[index]["image"][None].float()
            normalized = model.normalize(image)
            fp32 = model(normalized, aux_outputs=False)
            kept = fp32.pred_logits.softmax(-1)[..., :-1].max(-1).values > 0.8  # [1, Q]
            outputs = {}
            for name, run in variants.items():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    start = time.perf_counter() if name == "bf16_compiled" and index == 0 else None
                    outputs[name] = out = run(normalized)
                    if start is not None:
                        compile_seconds = round(time.perf_counter() - start, 1)
                same = (fp32.pred_masks > 0) == (out.pred_masks.float() > 0)
                count = counts[name]
                count["agree_all"] += int(same.sum())
                count["total_all"] += same.numel()
                count["agree_kept"] += int(same[kept].sum())
                count["total_kept"] += int(same[kept].numel())
            max_diff_cast_weights = max(max_diff_cast_weights, float(
                (outputs["bf16"].pred_masks.float() - outputs["bf16_cast_weights"].pred_masks.float()).abs().max()))
    metrics = {}
    for precision in ("fp32", "bf16"):
        result = evaluate_model(model, dataset, FashionScenes.label_space, precision=precision)["metrics"]
        metrics[precision] = {key: round(result[key], 2) for key in ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")}
    result = {
        "checkpoint": str(args.checkpoint),
        "images": len(dataset),
        "pixel_decoder_fp32": getattr(model.pixel_decoder, "fp32", None),
        "mask_sign_agreement_bf16_vs_fp32": {
            "all_queries": round(counts["bf16"]["agree_all"] / counts["bf16"]["total_all"], 5),
            "kept_queries": round(counts["bf16"]["agree_kept"] / max(counts["bf16"]["total_kept"], 1), 5),
            "kept_query_pixels": counts["bf16"]["total_kept"],
        },
        "mask_sign_agreement_per_variant": {
            name: {"all_queries": round(c["agree_all"] / c["total_all"], 5),
                   "kept_queries": round(c["agree_kept"] / max(c["total_kept"], 1), 5)}
            for name, c in counts.items()
        },
        "max_abs_diff_mask_logits_bf16_vs_cast_weights": max_diff_cast_weights,
        "compile_seconds_first_call": compile_seconds,
        "metrics": metrics,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
