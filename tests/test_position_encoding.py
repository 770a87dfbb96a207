import torch
from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding

from mask2former.modeling.position_encoding import SinePositionEncoding


def test_matches_transformers_sine_embedding():
    ours = SinePositionEncoding(num_pos_feats=32)
    theirs = Mask2FormerSinePositionEmbedding(num_position_features=32, normalize=True)
    x = torch.zeros(2, 64, 7, 11)
    expected = theirs(x.shape, x.device, x.dtype)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)


def test_layout_is_y_then_x():
    enc = SinePositionEncoding(num_pos_feats=4)(torch.zeros(1, 8, 3, 5))
    # y half varies along rows only, x half along columns only
    assert torch.all(enc[0, :4, :, 0:1] == enc[0, :4, :, :])
    assert torch.all(enc[0, 4:, 0:1, :] == enc[0, 4:, :, :])
