import pytest
import torch

from mask2former.modeling import kernels
from mask2former.training.point_sampling import (
    mask_uncertainty,
    point_sample,
    point_sample_shared,
    uncertain_point_coords,
)


def test_point_sample_matches_hand_computed_bilinear():
    # 3 rows x 4 columns; value = 10 * row + column.
    image = (10 * torch.arange(3.0)[:, None] + torch.arange(4.0)[None, :])[None, None]
    # Normalised (x, y) -> pixel coordinates x*W - 0.5, y*H - 0.5 (pixel centres at i + 0.5).
    coords = torch.tensor([[[0.5, 0.5], [0.125, 1 / 6], [0.3, 0.4], [0.0, 0.0]]])
    values = point_sample(image, coords)
    assert values.shape == (1, 1, 4)
    # (0.5, 0.5) -> pixel (x=1.5, y=1.0): between columns 1 and 2 of row 1 -> 11.5
    # (0.125, 1/6) -> pixel (0, 0) exactly -> 0
    # (0.3, 0.4) -> pixel (x=0.7, y=0.7): 0.3*0.3*0 + 0.7*0.3*1 + 0.3*0.7*10 + 0.7*0.7*11 = 7.7
    # (0, 0) -> pixel (-0.5, -0.5): only a quarter of pixel (0, 0) is inside, zeros outside -> 0
    expected = torch.tensor([11.5, 0.0, 7.7, 0.0])
    torch.testing.assert_close(values[0, 0], expected, rtol=1e-5, atol=1e-5)
    # Corner pixel with a non-zero value shows the zero padding outside the map.
    corner = point_sample(image + 4, torch.tensor([[[0.0, 0.0]]]))
    torch.testing.assert_close(corner[0, 0], torch.tensor([1.0]))


def test_point_sample_channels_and_batch():
    inputs = torch.randn(2, 3, 5, 6)
    coords = torch.rand(2, 7, 2)
    out = point_sample(inputs, coords)
    assert out.shape == (2, 3, 7)
    # Each image uses its own coordinates.
    torch.testing.assert_close(out[1:], point_sample(inputs[1:], coords[1:]))
    with pytest.raises(ValueError, match="coords"):
        point_sample(inputs, coords[..., :1])


@pytest.mark.parametrize("backend", ["auto", "pytorch"])
def test_point_sample_shared_equals_point_sample(backend):
    # Points inside, on the border and outside the map; 1 and many channels; fp32 and fp64.
    coords = torch.cat([torch.rand(50, 2), torch.tensor([[0.0, 0.0], [1.0, 1.0], [-0.2, 0.5], [0.5, 1.3]])])
    with kernels.ms_deform_attn_backend(backend):
        for inputs in (torch.randn(7, 5, 6), torch.randn(1, 4, 3, dtype=torch.float64)):
            expected = point_sample(inputs[None], coords[None].to(inputs.dtype))[0]
            torch.testing.assert_close(point_sample_shared(inputs, coords), expected)
    with pytest.raises(ValueError, match="coords"):
        point_sample_shared(torch.zeros(2, 3, 3), coords[None])


def test_uncertain_point_coords_shape_range_and_importance():
    logits = torch.randn(3, 1, 8, 8) * 4
    num_points, oversample, beta = 40, 3.0, 0.75
    seed = 123
    coords = uncertain_point_coords(logits, num_points, oversample, beta, generator=torch.Generator().manual_seed(seed))
    assert coords.shape == (3, num_points, 2)
    assert coords.min() >= 0 and coords.max() <= 1

    # Replay the draws: 120 candidates per mask, then 10 uniform points.
    replay = torch.Generator().manual_seed(seed)
    candidates = torch.rand(3, 120, 2, generator=replay)
    uniform = torch.rand(3, 10, 2, generator=replay)
    uncertainty = mask_uncertainty(point_sample(logits, candidates))[:, 0]
    num_important = int(beta * num_points)
    for m in range(3):
        important = coords[m, :num_important]
        # Every kept point is one of the candidates ...
        match = (important[:, None, :] == candidates[m][None]).all(-1)
        assert match.any(1).all()
        kept = match.float().argmax(1)
        # ... and it is among the most uncertain ones: none left out is more uncertain.
        left_out = torch.ones(120, dtype=torch.bool)
        left_out[kept] = False
        assert uncertainty[m, kept].min() >= uncertainty[m, left_out].max()
    torch.testing.assert_close(coords[:, num_important:], uniform)


def test_uncertain_point_coords_concentrate_on_the_boundary():
    # Logits change sign at x = 0.5: importance points must lie close to that line.
    width = 64
    column_centres = (torch.arange(width) + 0.5) / width
    logits = ((column_centres - 0.5) * 40).expand(width, width)[None, None].contiguous()
    coords = uncertain_point_coords(logits, 200, 3.0, 0.75, generator=torch.Generator().manual_seed(0))
    important_x = coords[0, :150, 0]
    uniform_x = coords[0, 150:, 0]
    assert (important_x - 0.5).abs().mean() < 0.5 * (uniform_x - 0.5).abs().mean()


def test_uncertain_point_coords_global_rng_reproducible_and_validated():
    logits = torch.randn(2, 1, 6, 6)
    torch.manual_seed(5)
    first = uncertain_point_coords(logits, 16)
    torch.manual_seed(5)
    assert torch.equal(first, uncertain_point_coords(logits, 16))
    assert uncertain_point_coords(logits, 16, importance_sample_ratio=1.0).shape == (2, 16, 2)
    assert uncertain_point_coords(logits, 16, importance_sample_ratio=0.0).shape == (2, 16, 2)
    with pytest.raises(ValueError, match="mask_logits"):
        uncertain_point_coords(torch.randn(2, 2, 6, 6), 16)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        uncertain_point_coords(logits, 16, importance_sample_ratio=1.5)


def test_point_sample_matched_equals_sampling_the_gathered_masks():
    from mask2former.training.point_sampling import point_sample_matched

    generator = torch.Generator().manual_seed(3)
    masks = [(torch.rand(n, 20, 24, generator=generator) > 0.5).float() for n in (5, 3, 0, 4)]
    # image 0: 3 of 5 targets matched, out of order; image 1: all; image 2: none; image 3: a target matched twice
    # (a hand-made assignment), which takes the gathering path.
    indices = [torch.tensor([4, 0, 2]), torch.tensor([1, 2, 0]), torch.tensor([], dtype=torch.int64),
               torch.tensor([3, 3, 1])]
    coords = torch.rand(9, 50, 2, generator=generator) * 1.2 - 0.1  # some points outside the map read zeros
    gathered = torch.cat([m[j] for m, j in zip(masks, indices)])[:, None]
    expected = point_sample(gathered, coords)[:, 0]
    assert torch.equal(point_sample_matched(masks, indices, coords), expected)
