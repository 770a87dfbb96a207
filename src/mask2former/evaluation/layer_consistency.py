"""MP-Former diagnostics: layer-wise mask consistency (mIoU-L) and query utilisation (Util).

MP-Former (Zhang et al., arXiv 2303.07336) motivates mask piloting with two measurements of how
inconsistent consecutive Mask2Former decoder predictions are. The paper's text with the exact formulas
was **not at hand** when this module was written and the released MP-Former code does not implement
them, so the definitions below are our own reconstruction from the paper's description; report them
with these definitions next to any number.

Notation: the decoder makes ``L`` mask predictions (the initial-query prediction, then one per layer; the
last one is the final output). ``M_i[q]`` is query ``q``'s binary mask at prediction ``i``,
``sigmoid(logit) > 0.5`` (equivalently ``logit > 0``) at the 1/4 mask resolution. ``match_i(t)`` is the
query that the Hungarian matcher assigns to ground-truth object ``t`` at prediction ``i`` (the matching
used for deep supervision).

- **mIoU-L_i** for ``i = 0 .. L-2``: for each image, take the queries matched at the **final** prediction,
  ``{match_{L-1}(t)}``; for each such query compute ``IoU(M_i[q], M_{i+1}[q])`` (1.0 when both masks are
  empty); average over those queries, then over the images that have at least one matched query.
- **Util_i** for ``i = 0 .. L-1``: the fraction of ground-truth objects (pooled over all images) with
  ``match_i(t) == match_{L-1}(t)``, i.e. whose query at prediction ``i`` is already the one that serves
  them at the end. ``Util_{L-1}`` is 1 by construction and is included for completeness; the summary
  means below leave it out.

``mean_mIoU_L`` averages mIoU-L_i over ``i``; ``mean_Util`` averages Util_i over ``i < L-1``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["LayerConsistency", "mask_predictions_from_outputs"]


def mask_predictions_from_outputs(outputs: Any) -> list[Tensor]:
    """Per-prediction mask logits [B, Q, h, w] in decoder order (aux outputs, then the final one)."""
    get = (lambda key: outputs[key]) if isinstance(outputs, Mapping) else (lambda key: getattr(outputs, key))
    return [aux["pred_masks"] for aux in get("aux_outputs")] + [get("pred_masks")]


class LayerConsistency:
    """Accumulates mIoU-L and Util over batches (definitions in the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.num_predictions: int | None = None
        self.iou_sum: list[float] = []  # per layer pair: sum over images of the per-image mean IoU
        self.images_with_matches = 0
        self.same_query: list[int] = []  # per prediction: objects whose query equals the final one
        self.num_objects = 0

    def update(self, mask_predictions: Sequence[Tensor], indices: Sequence[Sequence[tuple[Tensor, Tensor]]]) -> None:
        """``mask_predictions``: L tensors [B, Q, h, w]; ``indices``: L lists (one per prediction) of B
        ``(query_idx, target_idx)`` pairs, as returned by the matcher for each prediction."""
        num_predictions = len(mask_predictions)
        if num_predictions < 2:
            raise ValueError(f"need at least two decoder predictions, got {num_predictions}")
        if len(indices) != num_predictions:
            raise ValueError(f"got {len(indices)} matching results for {num_predictions} predictions")
        if self.num_predictions is None:
            self.num_predictions = num_predictions
            self.iou_sum = [0.0] * (num_predictions - 1)
            self.same_query = [0] * num_predictions
        elif self.num_predictions != num_predictions:
            raise ValueError(f"number of predictions changed from {self.num_predictions} to {num_predictions}")
        batch = mask_predictions[0].shape[0]
        for layer, layer_indices in enumerate(indices):
            if len(layer_indices) != batch:
                raise ValueError(f"prediction {layer}: matching for {len(layer_indices)} images, batch has {batch}")

        for image in range(batch):
            final_query, final_target = (torch.as_tensor(x).long().cpu() for x in indices[-1][image])
            if final_query.numel() == 0:
                continue
            order = torch.argsort(final_target)
            final_query, final_target = final_query[order], final_target[order]
            for layer in range(num_predictions):
                query, target = (torch.as_tensor(x).long().cpu() for x in indices[layer][image])
                query_of_target = dict(zip(target.tolist(), query.tolist()))
                self.same_query[layer] += sum(
                    query_of_target.get(t) == q for t, q in zip(final_target.tolist(), final_query.tolist())
                )
            self.num_objects += final_query.numel()

            # binary masks of the finally-matched queries at every prediction: [L, n, h*w]
            device = mask_predictions[0].device
            binary = torch.stack(
                [prediction[image, final_query.to(device)].flatten(1) > 0 for prediction in mask_predictions]
            )
            intersection = (binary[:-1] & binary[1:]).sum(-1).double()
            union = (binary[:-1] | binary[1:]).sum(-1).double()
            iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
            for pair, value in enumerate(iou.mean(1).tolist()):
                self.iou_sum[pair] += value
            self.images_with_matches += 1

    def compute(self) -> dict[str, Any]:
        if self.num_predictions is None or self.images_with_matches == 0:
            return {"mIoU_L": [], "Util": [], "mean_mIoU_L": math.nan, "mean_Util": math.nan,
                    "num_objects": 0, "num_images": 0}
        miou = [value / self.images_with_matches for value in self.iou_sum]
        util = [count / self.num_objects for count in self.same_query]
        return {
            "mIoU_L": miou,
            "Util": util,
            "mean_mIoU_L": sum(miou) / len(miou),
            "mean_Util": sum(util[:-1]) / len(util[:-1]),
            "num_objects": self.num_objects,
            "num_images": self.images_with_matches,
        }

    def format_table(self, results: dict[str, Any] | None = None) -> str:
        results = results if results is not None else self.compute()
        lines = [f"{'pred':>4} | {'mIoU-L':>7} | {'Util':>7}"]
        for layer, util in enumerate(results["Util"]):
            miou = results["mIoU_L"][layer] if layer < len(results["mIoU_L"]) else math.nan
            lines.append(f"{layer:>4} | {_pct(miou)} | {_pct(util)}")
        lines.append(f"{'mean':>4} | {_pct(results['mean_mIoU_L'])} | {_pct(results['mean_Util'])}")
        return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{'-':>7}" if math.isnan(value) else f"{100.0 * value:7.2f}"
