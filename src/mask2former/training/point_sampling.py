"""Point sampling for the mask losses: bilinear reads at normalised coordinates and
PointRend-style uncertainty-guided importance sampling (Mask2Former §3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modeling.ms_deform_attn import ms_deform_attn_core


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly read `inputs[N,C,H,W]` at `coords[N,P,2]` (x, y in [0, 1]) -> `[N,C,P]`.

    Coordinates are relative to the whole map with pixel centres at (i + 0.5) / size
    (grid_sample with align_corners=False); points outside the map read zeros.
    """
    if inputs.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(
            "point_sample: expected inputs [N,C,H,W] and coords [N,P,2], "
            f"got {tuple(inputs.shape)} and {tuple(coords.shape)}"
        )
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(inputs.dtype)  # [N,P,1,2] in grid_sample's [-1, 1]
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def point_sample_matched(masks_per_image: list[Tensor], targets_per_image: list[Tensor], coords: Tensor) -> Tensor:
    """``point_sample`` of the matched target masks ``cat([masks[j] for masks, j in ...])`` at ``coords[M,P,2]``
    -> ``[M,P]``, without gathering full-resolution masks (at 256^2 the gather and concatenation took 10 % of the
    default training step): each image's masks ``[N,H,W]`` are sampled in place, each target at the coordinates of
    the pair it is matched in. Every output reads only its own plane at its own point, so the values are those of
    ``point_sample`` on the gathered masks. A target matched twice (possible in a hand-made assignment) is gathered.
    """
    rows, start = [], 0
    for masks, target in zip(masks_per_image, targets_per_image):
        count = len(target)
        if count == 0:
            continue
        target = target.to(masks.device)
        pair_coords = coords[start:start + count]
        start += count
        if len(torch.unique(target)) < count:
            rows.append(point_sample(masks[target][:, None], pair_coords)[:, 0])
            continue
        grid = pair_coords.new_zeros(masks.shape[0], coords.shape[1], 2)  # unmatched targets: sampled, dropped
        grid[target] = pair_coords
        rows.append(point_sample(masks[:, None], grid)[:, 0][target])
    return torch.cat(rows) if rows else coords.new_zeros(0, coords.shape[1])


def point_sample_shared(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly read every channel of `inputs[C,H,W]` at the same `coords[P,2]` -> `[C,P]`, as `point_sample`.

    This is MSDeformAttn's sampling core with one level, one point per query and unit weight, so it runs on the
    C (CPU) and Triton (CUDA) kernels where those are available: they read each point's C channels from a
    channels-last copy in one go, where grid_sample walks the C planes one after another (4x slower for the
    matcher's 100 masks x 12544 points on a CPU).
    """
    if inputs.dim() != 3 or coords.dim() != 2 or coords.shape[-1] != 2:
        raise ValueError(
            "point_sample_shared: expected inputs [C,H,W] and coords [P,2], "
            f"got {tuple(inputs.shape)} and {tuple(coords.shape)}"
        )
    channels, height, width = inputs.shape
    num_points = coords.shape[0]
    value = inputs.flatten(1).T.reshape(1, height * width, 1, channels)
    locations = coords.to(inputs.dtype).view(1, num_points, 1, 1, 1, 2)
    weights = torch.ones(1, num_points, 1, 1, 1, dtype=inputs.dtype, device=inputs.device)
    return ms_deform_attn_core(value, [(height, width)], locations, weights)[0].T


def mask_uncertainty(mask_logits: Tensor) -> Tensor:
    """Uncertainty of a binary mask logit: highest (0) at the decision boundary."""
    return -mask_logits.abs()


@torch.no_grad()
def uncertain_point_coords(
    mask_logits: Tensor,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick `num_points` coordinates per mask in [0, 1]^2, biased towards uncertain logits.

    Draws `num_points * oversample_ratio` uniform points per mask, keeps the
    `importance_sample_ratio * num_points` with the highest uncertainty (-|logit|), then
    appends uniform points for the rest. `mask_logits` is `[N,1,H,W]`; returns `[N,num_points,2]`.
    The two random draws happen in this order (oversampled, then the uniform remainder) so that
    runs with the same RNG state see the same points. `generator` must live on the logits' device.
    """
    if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
        raise ValueError(f"uncertain_point_coords: expected mask_logits [N,1,H,W], got {tuple(mask_logits.shape)}")
    if oversample_ratio < 1:
        raise ValueError(f"uncertain_point_coords: oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"uncertain_point_coords: importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    num_masks = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_uniform = num_points - num_uncertain

    candidates = torch.rand(num_masks, num_sampled, 2, device=device, generator=generator)
    uncertainty = mask_uncertainty(point_sample(mask_logits, candidates))[:, 0]  # [N, num_sampled]
    # Unsorted: the losses sum over points, so only which points are picked matters (2x faster on CPU).
    top = uncertainty.topk(num_uncertain, dim=1, sorted=False).indices  # [N, num_uncertain]
    coords = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_uniform > 0:
        uniform = torch.rand(num_masks, num_uniform, 2, device=device, generator=generator)
        coords = torch.cat([coords, uniform.to(coords.dtype)], dim=1)
    return coords
