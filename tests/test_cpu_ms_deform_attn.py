"""The C MSDeformAttn kernel for the CPU against the grid_sample path (the oracle), and its build and fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from mask2former.modeling import kernels
from mask2former.modeling.kernels import cpu_ms_deform_attn
from mask2former.modeling.kernels.cpu_ms_deform_attn import CompileError, ms_deform_attn_cpu
from mask2former.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_core_pytorch
from test_triton_ms_deform_attn import make_inputs

SHAPES = [(5, 7), (3, 2), (1, 1)]  # non-square, tiny and 1x1 levels


def outputs_and_grads(fn, inputs, grad_seed=1):
    inputs = [t.detach().requires_grad_() for t in inputs]
    output = fn(inputs[0], SHAPES, inputs[1], inputs[2])
    grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=output.dtype)
    return (output, *torch.autograd.grad(output, inputs, grad))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_forward_and_gradients_equal_grid_sample_path(dtype, tolerance):
    # About a fifth of the samples lie partly or wholly outside their map (zero padding on both sides).
    inputs = make_inputs(SHAPES, batch=2, queries=9, heads=3, dim=5, points=2, device="cpu", dtype=dtype)
    ours = outputs_and_grads(ms_deform_attn_cpu, inputs)
    reference = outputs_and_grads(ms_deform_attn_core_pytorch, inputs)
    for name, actual, expected in zip(("output", "value", "locations", "weights"), ours, reference):
        assert actual.dtype == dtype, name
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=name)


def test_gradcheck():
    inputs = make_inputs(SHAPES, batch=1, queries=3, heads=2, dim=3, points=2, device="cpu", dtype=torch.float64)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_cpu(v, SHAPES, loc, w), inputs)


def test_result_does_not_depend_on_thread_count():
    inputs = make_inputs(SHAPES, batch=2, queries=7, heads=3, dim=4, points=3, device="cpu", dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(outputs_and_grads(ms_deform_attn_cpu, inputs))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_far_outside_and_nan_locations_sample_zero_like_grid_sample():
    value, locations, weights = make_inputs(SHAPES, 1, 4, 1, 3, 1, "cpu", torch.float64)
    locations[0, 0] = 50.0
    locations[0, 1] = -1e30
    locations[0, 2] = float("nan")
    ours = outputs_and_grads(ms_deform_attn_cpu, (value, locations, weights))
    assert torch.all(ours[0][0, :3] == 0) and torch.all(ours[2][0, :3] == 0) and torch.all(ours[3][0, :3] == 0)
    # The finite ones agree with grid_sample (NaN is left out: what grid_sample does with it is unspecified).
    reference = outputs_and_grads(ms_deform_attn_core_pytorch, (value, locations.nan_to_num(), weights))
    torch.testing.assert_close(ours[0][0, 3], reference[0][0, 3])
    torch.testing.assert_close(ours[0][0, :2], reference[0][0, :2])


def test_low_precision_inputs_compute_in_fp32_and_get_gradients_in_their_own_dtype():
    value, locations, weights = make_inputs(SHAPES, 1, 5, 2, 4, 2, "cpu", torch.float32)
    value = value.bfloat16().requires_grad_()
    output = ms_deform_attn_cpu(value, SHAPES, locations, weights)
    assert output.dtype == torch.float32
    output.sum().backward()
    assert value.grad.dtype == torch.bfloat16
    torch.testing.assert_close(output, ms_deform_attn_core_pytorch(value.detach(), SHAPES, locations, weights))


def test_bad_inputs_name_what_is_wrong():
    value, locations, weights = make_inputs(SHAPES, 1, 2, 1, 2, 1, "cpu", torch.float32)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_cpu(value, [(5, 7), (3, 2)], locations, weights)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        ms_deform_attn_cpu(value, SHAPES, locations, weights[:, :1])


def test_auto_backend_uses_the_kernel_on_cpu_and_pytorch_when_tracing(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    attn = MSDeformAttn(embed_dim=16, num_levels=2, num_heads=2, num_points=2)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    inputs = (torch.randn(1, 5, 16), torch.rand(1, 5, 2, 2), torch.randn(1, 20, 16), [(4, 4), (2, 2)])
    calls = []
    monkeypatch.setattr(cpu_ms_deform_attn, "ms_deform_attn_cpu",
                        lambda *args: calls.append(1) or ms_deform_attn_cpu(*args))
    auto = attn(*inputs)
    assert calls == [1]
    with kernels.ms_deform_attn_backend("pytorch"):
        reference = attn(*inputs)
    torch.testing.assert_close(auto, reference, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated (the ONNX export still uses it)
        attn.requires_grad_(False)  # parameters become constants of a traced function
        torch.jit.trace(lambda *tensors: attn(*tensors, inputs[3]), inputs[:3], check_trace=False)  # traced graphs keep grid_sample
    assert calls == [1]


def test_without_a_compiler_auto_falls_back_with_one_warning_and_forcing_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MASK2FORMER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_failed_devices", set())
    monkeypatch.setattr(kernels, "_verified_devices", set())
    cpu_ms_deform_attn.load_library.cache_clear()
    try:
        attn = MSDeformAttn(embed_dim=16, num_levels=2, num_heads=2, num_points=2)
        inputs = (torch.randn(1, 5, 16), torch.rand(1, 5, 2, 2), torch.randn(1, 20, 16), [(4, 4), (2, 2)])
        with pytest.warns(RuntimeWarning, match="no C compiler found.*using the PyTorch path"):
            first = attn(*inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(attn(*inputs), first)
        with kernels.ms_deform_attn_backend("pytorch"):
            torch.testing.assert_close(attn(*inputs), first)
        with kernels.ms_deform_attn_backend("cpu"), pytest.raises(CompileError, match="no-such-cc"):
            attn(*inputs)
    finally:
        cpu_ms_deform_attn.load_library.cache_clear()


def test_compiled_library_is_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("MASK2FORMER_CACHE_DIR", str(tmp_path))
    cpu_ms_deform_attn.load_library.cache_clear()
    try:
        cpu_ms_deform_attn.load_library("float")
        built = sorted(tmp_path.iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"
        modified = built[0].stat().st_mtime_ns
        cpu_ms_deform_attn.load_library.cache_clear()
        cpu_ms_deform_attn.load_library("float")
        assert sorted(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == modified
    finally:
        cpu_ms_deform_attn.load_library.cache_clear()


def test_unusable_cache_dir_builds_in_a_temporary_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("MASK2FORMER_CACHE_DIR", str(blocker / "cache"))
    cpu_ms_deform_attn.load_library.cache_clear()
    try:
        value, locations, weights = make_inputs(SHAPES, 1, 3, 1, 2, 1, "cpu", torch.float32)
        forced = ms_deform_attn_cpu(value, SHAPES, locations, weights)
        torch.testing.assert_close(forced, ms_deform_attn_core_pytorch(value, SHAPES, locations, weights))
    finally:
        cpu_ms_deform_attn.load_library.cache_clear()


def test_compiler_without_openmp_still_builds_a_working_kernel(monkeypatch, tmp_path):
    # A wrapper compiler that rejects -fopenmp, as Apple's clang does: the next flag set is used.
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "error: unsupported option" >&2;'
                       ' exit 1; }; done\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("MASK2FORMER_CACHE_DIR", str(tmp_path / "cache"))
    cpu_ms_deform_attn.load_library.cache_clear()
    try:
        inputs = make_inputs(SHAPES, 2, 5, 2, 3, 2, "cpu", torch.float64)
        for actual, expected in zip(outputs_and_grads(ms_deform_attn_cpu, inputs),
                                    outputs_and_grads(ms_deform_attn_core_pytorch, inputs)):
            torch.testing.assert_close(actual, expected)
        built = list((tmp_path / "cache").glob("*.so"))
        assert len(built) == 1 and b"GOMP_" not in built[0].read_bytes()  # a serial build, without OpenMP calls
    finally:
        cpu_ms_deform_attn.load_library.cache_clear()


def test_bf16_inference_forward_matches_fp32_paths_within_bf16_rounding():
    # dim 37: the vectorised loop's remainder; NaN / far-out points: zero like the fp32 kernel.
    value, locations, weights = make_inputs(SHAPES, 2, 11, 3, 37, 2, "cpu", torch.float32)
    locations[0, 0] = 50.0
    locations[1, 1] = float("nan")
    value = value.bfloat16()
    with torch.no_grad():
        ours = ms_deform_attn_cpu(value, SHAPES, locations, weights)
        fp32_kernel = ms_deform_attn_cpu(value.float(), SHAPES, locations, weights)
        grid_sample = ms_deform_attn_core_pytorch(value.float(), SHAPES, locations.nan_to_num(), weights)
    assert ours.dtype == torch.bfloat16 and ours.shape == fp32_kernel.shape
    # Same fp32 sums as the fp32 kernel, rounded once to bfloat16 (nearest even): at most one bf16 step apart.
    torch.testing.assert_close(ours.float(), fp32_kernel.bfloat16().float(), rtol=2**-7, atol=1e-30)
    assert torch.all(ours[0, 0] == 0)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 1] = False  # what grid_sample does with NaN is unspecified
    torch.testing.assert_close(ours.float()[keep], grid_sample[keep], rtol=2**-7, atol=1e-5)


def test_bf16_value_that_needs_a_gradient_still_takes_the_fp32_kernel():
    value, locations, weights = make_inputs(SHAPES, 1, 5, 2, 4, 2, "cpu", torch.float32)
    locations.requires_grad_()
    output = ms_deform_attn_cpu(value.bfloat16(), SHAPES, locations, weights)
    assert output.dtype == torch.float32 and output.requires_grad


def test_msdeformattn_under_bf16_autocast_inference_uses_the_bf16_kernel(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    attn = MSDeformAttn(embed_dim=32, num_levels=2, num_heads=2, num_points=2).requires_grad_(False)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    generator = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (3, 3)]
    inputs = (torch.randn(1, 7, 32, generator=generator), torch.rand(1, 7, 2, 2, generator=generator),
              torch.randn(1, 39, 32, generator=generator), shapes)
    calls = []
    bf16_op = cpu_ms_deform_attn.msda_forward_bf16
    monkeypatch.setattr(cpu_ms_deform_attn, "msda_forward_bf16", lambda *args: calls.append(1) or bf16_op(*args))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        auto = attn(*inputs)
        with kernels.ms_deform_attn_backend("pytorch"):
            reference = attn(*inputs)
    assert calls == [1]
    assert auto.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(auto.float(), reference.float(), rtol=2e-2, atol=2e-2)
