import torch

from mask2former.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_core


def naive_bilinear(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value_map [D, H, W]; (x, y) normalised in [0, 1] with align_corners=False and zero padding."""
    _, height, width = value_map.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    total = torch.zeros(value_map.shape[0], dtype=torch.float64)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < width and 0 <= yy < height:
                total += weight * value_map[:, yy, xx].double()
    return total


def test_core_matches_naive_bilinear_sum(device):
    torch.manual_seed(1)
    shapes = [(3, 5), (2, 2)]
    batch, heads, dim, queries, points = 2, 2, 3, 4, 2
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, len(shapes), points, dtype=torch.float64)
    # On CUDA this runs the Triton kernel (in float64) against the same hand-computed sums.
    out = ms_deform_attn_core(value.to(device), shapes, locations.to(device), weights.to(device)).cpu()
    assert out.shape == (batch, queries, heads * dim)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                expected = torch.zeros(dim, dtype=torch.float64)
                for level, (height, width) in enumerate(shapes):
                    level_value = value[b, starts[level] : starts[level] + height * width, h].T.reshape(dim, height, width)
                    for p in range(points):
                        x, y = locations[b, q, h, level, p].tolist()
                        expected += weights[b, q, h, level, p] * naive_bilinear(level_value, x, y)
                torch.testing.assert_close(out[b, q, h * dim : (h + 1) * dim], expected)


def test_initial_offsets_form_rings_and_attention_is_uniform():
    attn = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=8, num_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    # head 0 points along +x with radius 1..4; head 2 along +y
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(bias[2, 0, :, 1], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.all(attn.attention_weights.weight == 0)


def test_module_gradients_flow(device):
    attn = MSDeformAttn(embed_dim=16, num_levels=2, num_heads=2, num_points=2).to(device)
    # At initialisation the offset and attention projections are zero, so no gradient reaches the query yet.
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.1)
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(1, 20, 16, device=device, requires_grad=True)
    query = torch.randn(1, 5, 16, device=device, requires_grad=True)
    ref = torch.rand(1, 5, 2, 2, device=device)
    attn(query, ref, value, shapes).sum().backward()
    assert value.grad.abs().sum() > 0 and query.grad.abs().sum() > 0
    assert attn.sampling_offsets.weight.grad.abs().sum() > 0
