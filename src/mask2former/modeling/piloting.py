"""What the masked-attention decoder asks of extra, ground-truth-piloted queries (MP-Former's mask piloting).

The decoder and ``Mask2Former.forward`` call only these hooks; ``training/mask_piloting.MaskPiloting`` implements
them from a batch's targets.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class QueryPiloting(Protocol):
    def extend_queries(self, queries: Tensor, query_pos: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """[B, Q, C] queries (and positions) -> [B, P + Q, C] with the P piloting queries first, and the
        self-attention mask [1, 1, P + Q, P + Q] (True = blocked)."""
        ...

    def override_attention_mask(self, blocked: Tensor, size: tuple[int, int], layer: int) -> Tensor:
        """The cross-attention mask [B, 1, P + Q, h*w] of decoder ``layer`` at feature ``size``, with the piloting
        rows replaced where that layer is piloted."""
        ...

    def split_predictions(self, predictions: list[tuple[Tensor, Tensor]]
                          ) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Any]]:
        """Per layer ``(class logits, mask logits)`` of all P + Q queries -> the Q matching queries' predictions,
        and the piloting ones as ``{"pred_logits", "pred_masks", "aux_outputs", ...}`` for the loss."""
        ...


__all__ = ["QueryPiloting"]
