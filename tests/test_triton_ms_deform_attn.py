"""The Triton MSDeformAttn kernel against the grid_sample path (the oracle), and the backend selection.

The GPU tests run only with CUDA and Triton; one CPU test runs the same kernels through Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess because Triton reads it at import) so CI checks the kernel logic too.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mask2former.modeling import kernels
from mask2former.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_core_pytorch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:
    HAS_TRITON = False

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON),
    reason="the Triton kernel needs a CUDA GPU and triton (run on a GPU machine; the CPU path is tested elsewhere)",
)


def make_inputs(shapes, batch, queries, heads, dim, points, device, dtype, seed=0):
    """Random inputs; about a fifth of the samples fall partly or wholly outside their map. Locations keep a
    margin from pixel centres so that both paths take the same bilinear cell (the location gradient jumps there)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, dim, generator=generator)
    locations = torch.empty(batch, queries, heads, len(shapes), points, 2)
    for level, (height, width) in enumerate(shapes):
        for axis, size in enumerate((width, height)):
            cell = torch.randint(-2, size + 1, (batch, queries, heads, points), generator=generator).float()
            fraction = 0.02 + 0.96 * torch.rand(batch, queries, heads, points, generator=generator)
            locations[:, :, :, level, :, axis] = (cell + 0.5 + fraction) / size
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator).softmax(-1)
    return [t.to(device=device, dtype=dtype) for t in (value, locations, weights)]


def run_both(shapes, value, locations, weights, grad_seed=1):
    """(output, grads) of the kernel on the given tensors and of the PyTorch path on their fp32/fp64 copies."""
    reference_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    results = []
    for fn, cast in ((kernels._import_triton_kernel(), None), (ms_deform_attn_core_pytorch, reference_dtype)):
        inputs = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in (value, locations, weights)]
        output = fn(inputs[0], shapes, inputs[1], inputs[2])
        generator = torch.Generator().manual_seed(grad_seed)
        grad = torch.randn(output.shape, generator=generator).to(output)
        results.append((output, torch.autograd.grad(output, inputs, grad.to(value.dtype).to(output.dtype))))
    return results


def max_relative_error(actual, expected):
    """max |actual - expected| over max |expected| (a scale-free error for whole tensors)."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12)).item()


CASES = [
    # (levels, batch, queries, heads, dim, points)
    pytest.param([(5, 7), (10, 14), (20, 28)], 2, 50, 8, 32, 4, id="small"),
    pytest.param([(16, 16), (32, 32), (64, 64)], 2, 2000, 8, 32, 4, id="medium"),
    pytest.param([(3, 9), (6, 18), (12, 36), (24, 72)], 1, 300, 4, 24, 2, id="4levels-dim24"),
]
# Errors relative to the largest reference entry: fp32 accumulates in a different order; bf16 rounds inputs
# alike for both, the kernel accumulates in fp32 and rounds once on output.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shapes,batch,queries,heads,dim,points", CASES)
def test_forward_and_backward_match_grid_sample_path(shapes, batch, queries, heads, dim, points, dtype):
    value, locations, weights = make_inputs(shapes, batch, queries, heads, dim, points, "cuda", dtype)
    (out, grads), (ref_out, ref_grads) = run_both(shapes, value, locations, weights)
    assert out.dtype == dtype and out.shape == ref_out.shape == (batch, queries, heads * dim)
    assert [g.dtype for g in grads] == [dtype] * 3
    for name, actual, expected in zip(("output", "grad_value", "grad_locations", "grad_weights"),
                                      (out, *grads), (ref_out, *ref_grads)):
        error = max_relative_error(actual, expected)
        assert error < TOLERANCE[dtype], f"{name}: relative error {error:.2e} ({dtype})"


@needs_cuda
def test_float64_matches_and_passes_gradcheck():
    shapes = [(3, 5), (6, 10), (12, 20)]
    value, locations, weights = make_inputs(shapes, 2, 40, 8, 32, 4, "cuda", torch.float64)
    (out, grads), (ref_out, ref_grads) = run_both(shapes, value, locations, weights)
    for actual, expected in zip((out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    small_shapes = [(2, 3), (3, 4)]
    small = [t.requires_grad_() for t in make_inputs(small_shapes, 1, 3, 2, 4, 2, "cuda", torch.float64)]
    kernel = kernels._import_triton_kernel()
    assert torch.autograd.gradcheck(lambda v, l, w: kernel(v, small_shapes, l, w), small, eps=1e-6, atol=1e-6)


@needs_cuda
def test_untouched_value_gets_zero_gradient_and_outside_points_give_zero():
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(1, 20, 2, 8, device="cuda", requires_grad=True)
    # Every sample wholly outside its map: output, value and location gradients are exactly zero.
    locations = torch.full((1, 3, 2, 2, 2, 2), 1.7, device="cuda").requires_grad_()
    weights = torch.rand(1, 3, 2, 2, 2, device="cuda", requires_grad=True)
    out = kernels._import_triton_kernel()(value, shapes, locations, weights)
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(value.grad == 0) and torch.all(locations.grad == 0)


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_module_uses_kernel_on_cuda_and_matches_pytorch_backend(autocast):
    torch.manual_seed(0)
    attn = MSDeformAttn(embed_dim=256, num_levels=3, num_heads=8, num_points=4).cuda()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.5)
    shapes = [(8, 8), (16, 16), (32, 32)]
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(2, tokens, 256, device="cuda")
    query = torch.randn(2, tokens, 256, device="cuda")
    reference_points = torch.rand(2, tokens, 3, 2, device="cuda")
    results = {}
    for backend in ("triton", "pytorch"):
        attn.zero_grad()
        with kernels.ms_deform_attn_backend(backend), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            output = attn(query, reference_points, value, shapes)
        output.float().square().mean().backward()
        results[backend] = (output.float(), attn.sampling_offsets.weight.grad.clone(), attn.value_proj.weight.grad.clone())
    tolerance = 2e-2 if autocast else 1e-4
    for actual, expected in zip(results["triton"], results["pytorch"]):
        assert max_relative_error(actual, expected) < tolerance


@needs_cuda
def test_auto_backend_picks_triton_on_cuda_and_the_cpu_kernel_on_cpu(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    cuda_value = torch.zeros(1, 1, 1, 1, device="cuda")
    assert kernels.select_ms_deform_attn(cuda_value, ms_deform_attn_core_pytorch) is not ms_deform_attn_core_pytorch
    assert kernels._auto_kernel(cuda_value) is kernels._import_triton_kernel()
    assert kernels._auto_kernel(cuda_value.cpu()) is kernels._cpu_kernel
    monkeypatch.setenv(kernels.ENV_VAR, "pytorch")
    assert kernels.select_ms_deform_attn(cuda_value, ms_deform_attn_core_pytorch) is ms_deform_attn_core_pytorch


# ----------------------------------------------------------------------------------------------- CPU


def test_backend_switch_on_cpu(monkeypatch):
    value = torch.zeros(1, 1, 1, 1)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # "auto" on the CPU is the C kernel (tests/test_cpu_ms_deform_attn.py), guarded by the PyTorch fallback.
    assert kernels.select_ms_deform_attn(value, ms_deform_attn_core_pytorch) is not ms_deform_attn_core_pytorch
    monkeypatch.setenv(kernels.ENV_VAR, "cpu")
    assert kernels.select_ms_deform_attn(value, ms_deform_attn_core_pytorch) is kernels._cpu_kernel
    monkeypatch.setenv(kernels.ENV_VAR, "pytorch")
    assert kernels.select_ms_deform_attn(value, ms_deform_attn_core_pytorch) is ms_deform_attn_core_pytorch
    monkeypatch.setenv(kernels.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="MASK2FORMER_MSDA_BACKEND.*unknown MSDeformAttn backend 'cuda-please'"):
        kernels.select_ms_deform_attn(value, ms_deform_attn_core_pytorch)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="triton"):
        kernels.select_ms_deform_attn(value, ms_deform_attn_core_pytorch)
    # Code overrides the environment, and the context manager restores what was there.
    with kernels.ms_deform_attn_backend("pytorch"):
        assert kernels.select_ms_deform_attn(value, ms_deform_attn_core_pytorch) is ms_deform_attn_core_pytorch
    with pytest.raises(ValueError, match="unknown MSDeformAttn backend"):
        kernels.set_ms_deform_attn_backend("fast")
    assert kernels.current_backend() == "triton"


def test_without_triton_the_model_runs_on_the_pytorch_path(monkeypatch):
    # sys.modules["triton"] = None makes every "import triton" raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "mask2former.modeling.kernels.triton_ms_deform_attn", raising=False)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels._import_triton_kernel.cache_clear()
    try:
        assert not kernels.triton_available()
        attn = MSDeformAttn(embed_dim=16, num_levels=2, num_heads=2, num_points=2)
        inputs = (torch.randn(1, 5, 16), torch.rand(1, 5, 2, 2), torch.randn(1, 20, 16), [(4, 4), (2, 2)])
        assert attn(*inputs).shape == (1, 5, 16)
        with kernels.ms_deform_attn_backend("triton"), pytest.raises(RuntimeError, match="cannot be imported"):
            attn(*inputs)
    finally:
        kernels._import_triton_kernel.cache_clear()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_logic_in_triton_interpreter_on_cpu():
    """fp64, tiny shapes, non-power-of-two head dim, points outside: forward (both loop variants) and all
    gradients equal the grid_sample path, through Triton's CPU interpreter and the backend switch."""
    script = textwrap.dedent(
        """
        import torch
        from mask2former.modeling.ms_deform_attn import ms_deform_attn_core, ms_deform_attn_core_pytorch
        shapes = [(3, 5), (6, 2)]
        value, locations, weights = make_inputs(shapes, 2, 6, 2, 3, 2, "cpu", torch.float64)
        inputs = [t.requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn_core(inputs[0], shapes, inputs[1], inputs[2])  # forced to Triton by the env
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out) + out.detach())
        ref = ms_deform_attn_core_pytorch(inputs[0], shapes, inputs[1], inputs[2])
        ref_grads = torch.autograd.grad(ref, inputs, torch.ones_like(ref) + ref.detach())
        for actual, expected in zip((out, *grads), (ref, *ref_grads)):
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        # The forward's run-time sample loop (the unrolled one is the default).
        from mask2former.modeling.kernels import triton_ms_deform_attn
        triton_ms_deform_attn.UNROLL_SAMPLES["forward"] = False
        rolled = ms_deform_attn_core(inputs[0], shapes, inputs[1], inputs[2])
        torch.testing.assert_close(rolled, ref, rtol=1e-10, atol=1e-12)
        print("ok")
        """
    )
    script = inspect.getsource(make_inputs) + script
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", MASK2FORMER_MSDA_BACKEND="triton", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                            cwd=root)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]

