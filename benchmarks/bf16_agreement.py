"""How much bf16 autocast changes a *trained* model's output (CPU): mask-logit signs and panoptic quality.

The forward benchmark measures sign agreement on random unit-scale weights, where many mask logits sit near zero.
This script asks the same question of a trained checkpoint (e.g. ``runs/fashion_scenes/model_final`` from
``mask2former train``) on FashionScenes val images: the share of mask-logit entries whose sign under bf16 equals
fp32 (all queries, and the queries that survive panoptic post-processing: class score > 0.8), and PQ / AP / mIoU with
``precision`` fp32 vs bf16.

    python benchmarks/bf16_agreement.py --checkpoint runs/fashion_scenes/model_final [--images 100]

Writes benchmarks/results/bf16_agreement.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bf16_agreement.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a model directory (save_pretrained)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mask2former.data import FashionScenes
    from mask2former.evaluation.evaluator import evaluate_model
    from mask2former.modeling.model import Mask2Former

    model = Mask2Former.from_pretrained(args.checkpoint).eval()
    dataset = FashionScenes("val", num_images=args.images)
    agree_all = agree_kept = total_all = total_kept = 0
    with torch.inference_mode():
        for index in range(len(dataset)):
            image = dataset[index]["image"][None].float()
            normalized = model.normalize(image)
            fp32 = model(normalized, aux_outputs=False)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model(normalized, aux_outputs=False)
            same = (fp32.pred_masks > 0) == (bf16.pred_masks.float() > 0)
            agree_all += int(same.sum())
            total_all += same.numel()
            kept = fp32.pred_logits.softmax(-1)[..., :-1].max(-1).values > 0.8  # [1, Q]
            agree_kept += int(same[kept].sum())
            total_kept += int(same[kept].numel())
    metrics = {}
    for precision in ("fp32", "bf16"):
        result = evaluate_model(model, dataset, FashionScenes.label_space, precision=precision)["metrics"]
        metrics[precision] = {key: round(result[key], 2) for key in ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")}
    result = {
        "checkpoint": str(args.checkpoint),
        "images": len(dataset),
        "mask_sign_agreement_bf16_vs_fp32": {
            "all_queries": round(agree_all / total_all, 5),
            "kept_queries": round(agree_kept / max(total_kept, 1), 5),
            "kept_query_pixels": total_kept,
        },
        "metrics": metrics,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
