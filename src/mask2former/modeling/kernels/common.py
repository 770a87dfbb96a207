"""What the MSDeformAttn kernels share: the sampling core's input contract. Imports nothing from the kernels, so
the package (which picks a kernel) and the kernel modules (which check their inputs) both import it."""

from __future__ import annotations

from torch import Tensor


def check_core_inputs(where: str, value: Tensor, spatial_shapes, sampling_locations: Tensor,
                      attention_weights: Tensor) -> None:
    """The shapes the sampling core's contract asks for (value [B,S,heads,D], locations [B,Lq,heads,L,P,2], weights
    [B,Lq,heads,L,P], levels summing to S); a kernel checks its own dtypes and devices."""
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError(
            f"{where}: expected value [B,S,heads,D], locations [B,Lq,heads,L,P,2], weights [B,Lq,heads,L,P]; got "
            f"{tuple(value.shape)}, {tuple(sampling_locations.shape)}, {tuple(attention_weights.shape)}"
        )
    batch, tokens, heads, _ = value.shape
    loc_batch, queries, loc_heads, levels, points, two = sampling_locations.shape
    if (loc_batch, loc_heads, two) != (batch, heads, 2) or tuple(attention_weights.shape) != (
            batch, queries, heads, levels, points):
        raise ValueError(
            f"{where}: inconsistent shapes value {tuple(value.shape)}, locations {tuple(sampling_locations.shape)}, "
            f"weights {tuple(attention_weights.shape)}"
        )
    if len(spatial_shapes) != levels or sum(h * w for h, w in spatial_shapes) != tokens:
        raise ValueError(
            f"{where}: spatial_shapes {list(spatial_shapes)} do not match {levels} levels and {tokens} value tokens"
        )
