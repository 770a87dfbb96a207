"""Weights cast to bf16 once give bf16-autocast outputs equal to casting them on every call (the oracle: autocast)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_swin_config
from mask2former.modeling.bf16_inference import cast_weights_for_bf16_autocast
from mask2former.modeling.model import Mask2Former


@pytest.mark.parametrize("pixel_decoder_fp32", [True, False])
def test_cast_weights_give_the_same_bf16_outputs_as_autocast(pixel_decoder_fp32):
    model = Mask2Former(tiny_swin_config(pixel_decoder_fp32=pixel_decoder_fp32)).eval()
    images = torch.randn(1, 3, 64, 96)
    cast = cast_weights_for_bf16_autocast(copy.deepcopy(model))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = model(images, aux_outputs=False), cast(images, aux_outputs=False)
    assert torch.equal(expected.pred_masks, actual.pred_masks)
    assert torch.equal(expected.pred_logits, actual.pred_logits)
    # The fp32 islands keep fp32 weights: sampling offsets always, the whole pixel decoder when it runs in fp32.
    attn = cast.pixel_decoder.encoder[0].self_attn
    assert attn.sampling_offsets.weight.dtype == attn.attention_weights.weight.dtype == torch.float32
    expected_dtype = torch.float32 if pixel_decoder_fp32 else torch.bfloat16
    assert attn.value_proj.weight.dtype == cast.pixel_decoder.output_conv[0].weight.dtype == expected_dtype
    assert cast.backbone.body.layers[0].blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert cast.transformer_decoder.layers[0].cross_attn.in_proj_weight.dtype == torch.bfloat16
    assert cast.transformer_decoder.layers[0].cross_norm.weight.dtype == torch.float32


def test_bf16_predictor_casts_a_copy_and_predicts_as_plain_autocast():
    from mask2former.inference.predictor import Predictor

    model = Mask2Former(tiny_swin_config(pixel_decoder_fp32=False)).eval()
    predictor = Predictor(model, task="semantic", precision="bf16")
    assert predictor.model is not model and model.transformer_decoder.layers[0].linear1.weight.dtype == torch.float32
    assert predictor.model.transformer_decoder.layers[0].linear1.weight.dtype == torch.bfloat16
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    expected = Predictor.__new__(Predictor)
    expected.__dict__.update(predictor.__dict__, model=model)  # the same predictor around the fp32-weight model
    assert torch.equal(predictor(image), expected(image))
