"""MSDeformAttn sampling core as Triton kernels (forward and backward), compiled at run time.

Same contract as ``ms_deform_attn_core``: value [B, S, heads, D], sampling_locations [B, Lq, heads, L, P, 2] in
[0, 1] as (x, y), attention_weights [B, Lq, heads, L, P] -> [B, Lq, heads*D]. Bilinear sampling with
``align_corners=False`` and zero padding, as ``grid_sample`` does.

One kernel row is one (batch, query, head) triple, which is also the memory order of the locations, the weights
and the output, so every row reads its own contiguous slice; a program owns ``BLOCK_ROWS`` rows and the head
dimension as a [rows, D] tile. Inputs may be fp16/bf16/fp32/fp64 (each tensor its own dtype); accumulation is in
fp32 (fp64 for fp64 inputs). The backward scatters the value gradient with atomic adds into an fp32 (fp64)
buffer; the location and weight gradients are reductions over D inside the row that owns them (no atomics).

Importing this module imports Triton: use ``mask2former.modeling.kernels`` to pick it safely.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import check_core_inputs

__all__ = ["ms_deform_attn_triton"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _bilinear_setup(loc_ptr, weight_ptr, rows, row_mask, height, width,
                    LP: tl.constexpr, index, ACC: tl.constexpr):
    """Location, weight and the corner geometry of sample ``index`` (= level*P + point) of every row."""
    x = tl.load(loc_ptr + rows * (2 * LP) + 2 * index, mask=row_mask, other=0.0).to(ACC)
    y = tl.load(loc_ptr + rows * (2 * LP) + 2 * index + 1, mask=row_mask, other=0.0).to(ACC)
    weight = tl.load(weight_ptr + rows * LP + index, mask=row_mask, other=0.0).to(ACC)
    # Pixel coordinates with align_corners=False. Points far outside are clamped to just outside the map, where
    # every corner is padding anyway; this keeps the integer conversion in range.
    px = tl.minimum(tl.maximum(x * width - 0.5, -2.0), width + 1.0)
    py = tl.minimum(tl.maximum(y * height - 0.5, -2.0), height + 1.0)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    return weight, px - x0f, py - y0f, x0f.to(tl.int32), y0f.to(tl.int32)


@triton.jit
def _corner_offsets(x0, y0, row_mask, height, width, start, base, token_stride, DX: tl.constexpr, DY: tl.constexpr):
    """Element offsets of one bilinear corner in ``value`` (per row) and whether it lies inside the map."""
    xi = x0 + DX
    yi = y0 + DY
    valid = row_mask & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    token = (start + yi * width + xi).to(tl.int64)
    return base + token * token_stride, valid


@triton.jit
def _corner_weights(fx, fy, DX: tl.constexpr, DY: tl.constexpr):
    """Bilinear weight of corner (x0 + DX, y0 + DY) split into its x and y factors."""
    corner_x = fx if DX == 1 else 1.0 - fx
    corner_y = fy if DY == 1 else 1.0 - fy
    return corner_x, corner_y


@triton.jit
def _corner_slopes(corner_x, corner_y, DX: tl.constexpr, DY: tl.constexpr):
    """d(corner weight)/d(px) and d/d(py): the weight is corner_x * corner_y, each factor linear with slope +-1."""
    slope_x = corner_y if DX == 1 else -corner_y
    slope_y = corner_x if DY == 1 else -corner_x
    return slope_x, slope_y


@triton.jit
def _forward_sample(value_ptr, levels_ptr, loc_ptr, weight_ptr, rows, row_mask, dims, dim_mask, base, token_stride,
                    acc, index, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr, ACC: tl.constexpr):
    """acc + the weighted bilinear sample ``index`` (= level*P + point) of every row."""
    level = index // NUM_POINTS
    height = tl.load(levels_ptr + 3 * level)
    width = tl.load(levels_ptr + 3 * level + 1)
    start = tl.load(levels_ptr + 3 * level + 2)
    weight, fx, fy, x0, y0 = _bilinear_setup(loc_ptr, weight_ptr, rows, row_mask, height, width,
                                             NUM_LEVELS * NUM_POINTS, index, ACC)
    for corner in tl.static_range(4):
        offsets, valid = _corner_offsets(x0, y0, row_mask, height, width, start, base, token_stride,
                                         corner % 2, corner // 2)
        corner_x, corner_y = _corner_weights(fx, fy, corner % 2, corner // 2)
        sample = tl.load(value_ptr + offsets[:, None] + dims[None, :],
                         mask=valid[:, None] & dim_mask[None, :], other=0.0).to(ACC)
        acc += (weight * corner_x * corner_y)[:, None] * sample
    return acc


@triton.jit(do_not_specialize=["num_rows", "rows_per_batch", "num_heads", "value_batch_stride"])
def _msda_forward_kernel(
    value_ptr, levels_ptr, loc_ptr, weight_ptr, out_ptr,
    num_rows, rows_per_batch, num_heads, value_batch_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, ACC: tl.constexpr, UNROLL: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    base = (rows // rows_per_batch) * value_batch_stride + (rows % num_heads) * HEAD_DIM
    token_stride = num_heads * HEAD_DIM
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=ACC)
    # Unrolled over the L*P samples, every gather can be in flight at once (faster, see UNROLL_SAMPLES);
    # the run-time loop compiles in a fraction of the time.
    if UNROLL:
        for index in tl.static_range(NUM_LEVELS * NUM_POINTS):
            acc = _forward_sample(value_ptr, levels_ptr, loc_ptr, weight_ptr, rows, row_mask, dims, dim_mask, base,
                                  token_stride, acc, index, NUM_LEVELS, NUM_POINTS, ACC)
    else:
        for index in range(NUM_LEVELS * NUM_POINTS):
            acc = _forward_sample(value_ptr, levels_ptr, loc_ptr, weight_ptr, rows, row_mask, dims, dim_mask, base,
                                  token_stride, acc, index, NUM_LEVELS, NUM_POINTS, ACC)
    out_offsets = rows[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit(do_not_specialize=["num_rows", "rows_per_batch", "num_heads", "value_batch_stride"])
def _msda_backward_kernel(
    value_ptr, levels_ptr, loc_ptr, weight_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_weight_ptr,
    num_rows, rows_per_batch, num_heads, value_batch_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, ACC: tl.constexpr, VALUE_GRAD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    base = (rows // rows_per_batch) * value_batch_stride + (rows % num_heads) * HEAD_DIM
    token_stride = num_heads * HEAD_DIM
    grad_out = tl.load(grad_out_ptr + rows[:, None] * HEAD_DIM + dims[None, :],
                       mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(ACC)
    LP: tl.constexpr = NUM_LEVELS * NUM_POINTS
    for index in range(LP):
        level = index // NUM_POINTS
        height = tl.load(levels_ptr + 3 * level)
        width = tl.load(levels_ptr + 3 * level + 1)
        start = tl.load(levels_ptr + 3 * level + 2)
        weight, fx, fy, x0, y0 = _bilinear_setup(loc_ptr, weight_ptr, rows, row_mask, height, width, LP, index, ACC)
        grad_weight = tl.zeros([BLOCK_ROWS], dtype=ACC)
        grad_px = tl.zeros([BLOCK_ROWS], dtype=ACC)
        grad_py = tl.zeros([BLOCK_ROWS], dtype=ACC)
        for corner in tl.static_range(4):
            offsets, valid = _corner_offsets(x0, y0, row_mask, height, width, start, base, token_stride,
                                             corner % 2, corner // 2)
            corner_x, corner_y = _corner_weights(fx, fy, corner % 2, corner // 2)
            slope_x, slope_y = _corner_slopes(corner_x, corner_y, corner % 2, corner // 2)
            tile_mask = valid[:, None] & dim_mask[None, :]
            sample = tl.load(value_ptr + offsets[:, None] + dims[None, :], mask=tile_mask, other=0.0).to(ACC)
            # <grad_out, value at the corner>: everything but the value gradient is a multiple of it.
            projection = tl.sum(grad_out * sample, axis=1)
            grad_weight += corner_x * corner_y * projection
            grad_px += slope_x * projection
            grad_py += slope_y * projection
            if VALUE_GRAD:
                contribution = (weight * corner_x * corner_y)[:, None] * grad_out
                tl.atomic_add(grad_value_ptr + offsets[:, None] + dims[None, :], contribution, mask=tile_mask,
                              sem="relaxed")
        grad_loc_type = grad_loc_ptr.dtype.element_ty
        # px = x * width - 0.5, so d/dx = width * d/dpx (likewise y).
        tl.store(grad_loc_ptr + rows * (2 * LP) + 2 * index, (weight * width * grad_px).to(grad_loc_type),
                 mask=row_mask)
        tl.store(grad_loc_ptr + rows * (2 * LP) + 2 * index + 1, (weight * height * grad_py).to(grad_loc_type),
                 mask=row_mask)
        tl.store(grad_weight_ptr + rows * LP + index, grad_weight.to(grad_weight_ptr.dtype.element_ty),
                 mask=row_mask)


@functools.lru_cache(maxsize=64)
def _level_table(spatial_shapes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """[L, 3] int32 (height, width, first token) on ``device``; cached so a forward copies nothing to the GPU."""
    rows, start = [], 0
    for height, width in spatial_shapes:
        rows.append((height, width, start))
        start += height * width
    return torch.tensor(rows, dtype=torch.int32, device=device)


# Launch shape: each program holds about TILE_ELEMENTS accumulator entries ([rows, D]) over NUM_WARPS warps, and
# unrolls its loop over the L*P samples or not. Module-level so benchmarks/gpu.py can sweep them; the values are
# what that sweep chose on an H100 (benchmarks/results/gpu.json). The unrolled backward ran about 1.5x faster than
# the looped one but took ptxas tens of seconds to compile per dtype; the forward unrolled compiles quickly.
TILE_ELEMENTS = {"forward": 2048, "backward": 4096}
NUM_WARPS = {"forward": 8, "backward": 4}
UNROLL_SAMPLES = {"forward": True}


def _block_rows(block_d: int, which: str) -> int:
    return max(16, min(256, TILE_ELEMENTS[which] // block_d))


def _check_inputs(value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor) -> None:
    check_core_inputs("ms_deform_attn_triton", value, spatial_shapes, sampling_locations, attention_weights)
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"ms_deform_attn_triton: {name} dtype {tensor.dtype} is not supported")
        if tensor.device != value.device:
            raise ValueError(f"ms_deform_attn_triton: {name} is on {tensor.device}, value on {value.device}")
        if tensor.numel() >= 2**31:
            raise ValueError(f"ms_deform_attn_triton: {name} has {tensor.numel()} elements (limit 2**31 - 1)")


def _accumulator(*tensors: Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: tuple[tuple[int, int], ...], sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
        value = value.contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        batch, tokens, heads, head_dim = value.shape
        _, queries, _, levels, points, _ = sampling_locations.shape
        out_dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                        attention_weights.dtype)
        output = torch.empty(batch, queries, heads, head_dim, dtype=out_dtype, device=value.device)
        level_table = _level_table(spatial_shapes, value.device)
        block_d = triton.next_power_of_2(head_dim)
        block_rows = _block_rows(block_d, "forward")
        num_rows = batch * queries * heads
        if num_rows > 0:
            _msda_forward_kernel[(triton.cdiv(num_rows, block_rows),)](
                value, level_table, sampling_locations, attention_weights, output,
                num_rows, queries * heads, heads, tokens * heads * head_dim,
                HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_LEVELS=levels, NUM_POINTS=points, BLOCK_ROWS=block_rows,
                ACC=_accumulator(value, sampling_locations, attention_weights), UNROLL=UNROLL_SAMPLES["forward"],
                num_warps=NUM_WARPS["forward"],
            )
        ctx.save_for_backward(value, level_table, sampling_locations, attention_weights)
        return output.view(batch, queries, heads * head_dim)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        value, level_table, sampling_locations, attention_weights = ctx.saved_tensors
        batch, tokens, heads, head_dim = value.shape
        _, queries, _, levels, points, _ = sampling_locations.shape
        grad_output = grad_output.contiguous()
        accumulator = _accumulator(value, sampling_locations, attention_weights, grad_output)
        buffer_dtype = torch.float64 if accumulator == tl.float64 else torch.float32
        value_grad = ctx.needs_input_grad[0]
        # Atomic adds need a full-precision buffer; it doubles as the result when value is already that dtype.
        grad_value = torch.zeros(value.shape if value_grad else (1,), dtype=buffer_dtype, device=value.device)
        grad_locations = torch.empty_like(sampling_locations)
        grad_weights = torch.empty_like(attention_weights)
        block_d = triton.next_power_of_2(head_dim)
        block_rows = _block_rows(block_d, "backward")
        num_rows = batch * queries * heads
        if num_rows > 0:
            _msda_backward_kernel[(triton.cdiv(num_rows, block_rows),)](
                value, level_table, sampling_locations, attention_weights, grad_output,
                grad_value, grad_locations, grad_weights,
                num_rows, queries * heads, heads, tokens * heads * head_dim,
                HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_LEVELS=levels, NUM_POINTS=points, BLOCK_ROWS=block_rows,
                ACC=accumulator, VALUE_GRAD=value_grad, num_warps=NUM_WARPS["backward"],
            )
        grad_value = grad_value.to(value.dtype) if value_grad else None
        return (grad_value, None, grad_locations if ctx.needs_input_grad[2] else None,
                grad_weights if ctx.needs_input_grad[3] else None)


def ms_deform_attn_triton(
    value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Triton version of ``ms_deform_attn_core`` (same arguments and result), differentiable in all three tensors."""
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    return _MSDeformAttnFunction.apply(value, shapes, sampling_locations, attention_weights)
