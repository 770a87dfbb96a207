"""transformers Mask2Former checkpoints: a randomly initialised ``Mask2FormerForUniversalSegmentation`` saved with
``save_pretrained`` must give the same outputs (final and every auxiliary prediction) through our model."""

import dataclasses
import json
import shutil

import pytest
import torch
from random_inputs import informative_transformers_mask2former
from safetensors.torch import load_file, save_file

from mask2former.data.label_space import LabelSpace
from mask2former.interop.errors import CheckpointError
from mask2former.interop.hf import convert_hf_checkpoint
from mask2former.modeling.model import Mask2Former

transformers = pytest.importorskip("transformers")

NAMES = ["person", "car", "sky", "road", "tree"]
DECODER_LAYERS = 5  # transformers counts the initial-query prediction: 4 layers, levels 0, 1, 2, 0


def _tiny_hf_model():
    swin = transformers.SwinConfig(
        embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7, drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, hidden_dim=64, feature_size=64, mask_feature_size=64, num_queries=10,
        decoder_layers=DECODER_LAYERS, encoder_layers=2, num_attention_heads=4, dim_feedforward=128,
        encoder_feedforward_dim=128, id2label=dict(enumerate(NAMES)),
    )
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    return informative_transformers_mask2former(model, seed=1)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    model = _tiny_hf_model()
    directory = tmp_path_factory.mktemp("hf_mask2former")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def converted(hf_checkpoint):
    return Mask2Former.from_pretrained(hf_checkpoint[1]).eval()


def _hf_predictions(model, images):
    with torch.no_grad():
        out = model(pixel_values=images, output_auxiliary_logits=True)
    aux = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in out.auxiliary_logits]
    return aux + [(out.class_queries_logits, out.masks_queries_logits)]


def _our_predictions(model, images):
    with torch.no_grad():
        out = model(images)
    return [(a["pred_logits"], a["pred_masks"]) for a in out.aux_outputs] + [(out.pred_logits, out.pred_masks)]


def test_saved_file_uses_the_on_disk_swin_names(hf_checkpoint):
    keys = set(load_file(str(hf_checkpoint[1] / "model.safetensors")))
    assert "model.pixel_level_module.encoder.encoder.layers.0.blocks.0.attention.self.query.weight" in keys
    assert "model.pixel_level_module.encoder.encoder.layers.0.blocks.1.intermediate.dense.weight" in keys


# 256: every Swin stage pads to a window multiple (64, 32, 16, 8 vs window 7); 320x256: non-square;
# 192: the last stage (6x6) is smaller than one window, where transformers still pads and shifts.
@pytest.mark.parametrize("size, batch", [((256, 256), 1), ((320, 256), 2), ((192, 192), 2)])
def test_outputs_match_transformers(hf_checkpoint, converted, size, batch):
    hf_model, _ = hf_checkpoint
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(size[0] + batch))
    theirs = _hf_predictions(hf_model, images)
    ours = _our_predictions(converted, images)
    # Initial-query prediction + one per layer, the last being the output; transformers orders them the same way.
    assert len(ours) == len(theirs) == DECODER_LAYERS
    for index, ((their_logits, their_masks), (our_logits, our_masks)) in enumerate(zip(theirs, ours)):
        assert our_masks.shape == (batch, 10, size[0] // 4, size[1] // 4)
        torch.testing.assert_close(our_logits, their_logits, atol=1e-4, rtol=0, msg=lambda m: f"logits {index}: {m}")
        torch.testing.assert_close(our_masks, their_masks, atol=1e-4, rtol=0, msg=lambda m: f"masks {index}: {m}")
    # The comparison means something: outputs vary, and masks block a real share of the attention.
    final_logits, final_masks = theirs[-1]
    assert final_masks.std() > 1.0 and final_logits.std() > 0.3
    for _, masks in theirs:
        assert 0.2 < (masks < 0).float().mean() < 0.8


def test_transformers_swin_does_not_adapt_the_window(hf_checkpoint):
    """transformers' SwinBackbone keeps window 7 and the shift on a 6x6 map (as detectron2 does); the classification
    Swin's one-unshifted-window rule (adaptive_window=True) would give other numbers."""
    hf_model, directory = hf_checkpoint
    config, state, labels = convert_hf_checkpoint(directory)
    assert config.backbone.kwargs["adaptive_window"] is False
    backbone = dataclasses.replace(config.backbone, kwargs={**config.backbone.kwargs, "adaptive_window": True})
    adaptive = Mask2Former(dataclasses.replace(config, backbone=backbone), labels).eval()
    adaptive.load_state_dict(state)
    images = torch.randn(1, 3, 192, 192, generator=torch.Generator().manual_seed(3))
    difference = (_our_predictions(adaptive, images)[-1][1] - _hf_predictions(hf_model, images)[-1][1]).abs().max()
    assert difference > 1e-2


def test_converted_config_and_labels(hf_checkpoint):
    config, _, labels = convert_hf_checkpoint(hf_checkpoint[1])
    assert config.num_classes == 5 and config.num_queries == 10 and config.dec_layers == DECODER_LAYERS - 1
    assert (config.hidden_dim, config.conv_dim, config.mask_dim, config.num_heads) == (64, 64, 64, 4)
    assert (config.enc_layers, config.enc_ffn_dim, config.dim_feedforward) == (2, 128, 128)
    assert config.backbone.kwargs["embed_dim"] == 16 and list(config.backbone.kwargs["depths"]) == [2, 2, 2, 2]
    assert config.pixel_mean == (123.675, 116.28, 103.53)
    space = LabelSpace.from_dict(labels)
    assert space.names == NAMES
    assert space.is_thing == [True] * 5  # transformers has no thing/stuff split


def test_preprocessor_statistics_are_used(hf_checkpoint, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[1], directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "do_rescale": True, "rescale_factor": 1 / 255}
    ))
    config, _, _ = convert_hf_checkpoint(directory)
    assert config.pixel_mean == pytest.approx((127.5,) * 3) and config.pixel_std == pytest.approx((63.75,) * 3)


def test_in_memory_names_load_the_same(hf_checkpoint, converted, tmp_path):
    """transformers 5's module names (swin.encoder..., q_proj, o_proj, mlp.fc1, relative_position_bias...)."""
    hf_model, directory = hf_checkpoint
    state = {key: value.contiguous() for key, value in hf_model.state_dict().items()}
    assert any(".swin.encoder.layers.0.blocks.0.attention.q_proj.weight" in key for key in state)
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.safetensors"))
    reloaded = Mask2Former.from_pretrained(tmp_path)
    for key, value in converted.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_other_class_count_loads_all_but_the_class_head(hf_checkpoint, converted):
    with pytest.warns(UserWarning, match="except the class head"):
        model = Mask2Former.from_pretrained(hf_checkpoint[1], num_classes=3)
    assert model.num_classes == 3 and model.labels is None
    own = model.state_dict()
    assert own["transformer_decoder.heads.class_embed.weight"].shape == (4, 64)
    for key, value in converted.state_dict().items():
        if "class_embed" not in key:
            assert torch.equal(own[key], value), key


def _copy(hf_checkpoint, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[1], directory)
    return directory


def _edit_weights(directory, edit):
    state = load_file(str(directory / "model.safetensors"))
    edit(state)
    save_file(state, str(directory / "model.safetensors"))


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_corrupt_weights_file(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read the safetensors"):
        Mask2Former.from_pretrained(directory)


def test_unknown_tensor_is_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    _edit_weights(directory, lambda state: state.update({"model.transformer_module.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unknown tensor model\.transformer_module\.extra\.weight"):
        Mask2Former.from_pretrained(directory)


def test_missing_tensors_are_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    _edit_weights(directory, lambda state: state.pop("model.transformer_module.decoder.layers.1.fc1.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(first: transformer_decoder\.layers\.1\.linear1\.weight\)"):
        Mask2Former.from_pretrained(directory)
    key = "model.pixel_level_module.encoder.encoder.layers.2.blocks.1.attention.self.key.weight"
    directory = _copy(hf_checkpoint, tmp_path / "second")
    _edit_weights(directory, lambda state: state.pop(key))
    with pytest.raises(CheckpointError, match=r"layers\.2\.blocks\.1\.attn\.qkv\.weight has no 'k' projection"):
        Mask2Former.from_pretrained(directory)


def test_config_that_does_not_fit_the_weights(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    _edit_config(directory, lambda config: config.update(id2label={str(i): f"c{i}" for i in range(7)}))
    with pytest.raises(CheckpointError, match="class head has 5 classes but id2label"):
        Mask2Former.from_pretrained(directory)
    _edit_config(directory, lambda config: config.update(id2label={str(i): f"c{i}" for i in range(5)},
                                                         dim_feedforward=256))
    with pytest.raises(CheckpointError, match=r"layers\.0\.linear1\.(weight|bias) has shape \(128"):
        Mask2Former.from_pretrained(directory)


def test_unsupported_configs_are_refused(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    _edit_config(directory, lambda config: config["backbone_config"].update(model_type="resnet"))
    with pytest.raises(CheckpointError, match="backbone model_type 'resnet' is not supported"):
        Mask2Former.from_pretrained(directory)
    _edit_config(directory, lambda config: (config["backbone_config"].update(model_type="swin"),
                                            config.update(pre_norm=True)))
    with pytest.raises(CheckpointError, match="pre_norm"):
        Mask2Former.from_pretrained(directory)


def test_pickle_only_directory_is_refused(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are not read"):
        Mask2Former.from_pretrained(directory)
