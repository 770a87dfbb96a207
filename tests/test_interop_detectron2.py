"""Official detectron2 checkpoints: our weights written under the reference's key names and shapes, as a real
pickle file, must load back through ``Mask2Former.from_pretrained`` and give the same outputs."""

import dataclasses
import os
import pickle
import re

import numpy as np
import pytest
import torch
import yaml
from random_inputs import randomise_unit_scale

from mask2former.config import BackboneConfig, ModelConfig, to_dict
from mask2former.interop.errors import CheckpointError
from mask2former.interop.detectron2 import (
    convert_detectron2_checkpoint,
    save_detectron2_checkpoint,
    to_detectron2_state_dict,
)
from mask2former.interop.safe_pickle import UnsafeCheckpointError
from mask2former.modeling.model import Mask2Former

from conftest import tiny_swin_config

BN = ("weight", "bias", "running_mean", "running_var")
WB = ("weight", "bias")
ATTN = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
P, D = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."


def r50_config(**overrides) -> ModelConfig:
    # Eight heads as the reference (so the shapes alone determine the architecture); small everything else.
    values = dict(num_classes=5, backbone=BackboneConfig(name="resnet50"), hidden_dim=64, conv_dim=64, mask_dim=64,
                  num_heads=8, num_queries=6, dim_feedforward=96, enc_ffn_dim=128, enc_layers=1, dec_layers=3)
    values.update(overrides)
    return ModelConfig(**values)


def v1_config() -> ModelConfig:
    return tiny_swin_config(pixel_decoder="fpn", transformer_decoder="standard", dec_layers=2)


# ----- the official layouts, enumerated from the reference modules ----------------------------------------


def official_resnet_keys(blocks=(3, 4, 6, 3)) -> set[str]:
    keys = {"backbone.stem.conv1.weight"} | {f"backbone.stem.conv1.norm.{p}" for p in BN}
    for stage, count in zip(range(2, 6), blocks):
        for block in range(count):
            prefix = f"backbone.res{stage}.{block}."
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if block == 0 else [])
            for conv in convs:
                keys |= {prefix + conv + ".weight"} | {f"{prefix}{conv}.norm.{p}" for p in BN}
    return keys


def official_swin_keys(depths) -> set[str]:
    keys = {f"backbone.patch_embed.{m}.{p}" for m in ("proj", "norm") for p in WB}
    for stage, depth in enumerate(depths):
        keys |= {f"backbone.norm{stage}.{p}" for p in WB}
        for block in range(depth):
            prefix = f"backbone.layers.{stage}.blocks.{block}."
            modules = ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
            keys |= {prefix + m + "." + p for m in modules for p in WB}
            keys |= {prefix + "attn.relative_position_bias_table", prefix + "attn.relative_position_index"}
        if stage < len(depths) - 1:
            keys |= {f"backbone.layers.{stage}.downsample.reduction.weight"}
            keys |= {f"backbone.layers.{stage}.downsample.norm.{p}" for p in WB}
    return keys


def official_msdeformattn_keys(enc_layers) -> set[str]:
    keys = {P + "transformer.level_embed"}
    keys |= {f"{P}input_proj.{i}.{j}.{p}" for i in range(3) for j in range(2) for p in WB}
    for layer in range(enc_layers):
        prefix = f"{P}transformer.encoder.layers.{layer}."
        modules = ["self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                   "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"]
        keys |= {prefix + m + "." + p for m in modules for p in WB}
    keys |= {P + "adapter_1.weight", P + "layer_1.weight"}
    keys |= {P + f"{m}.norm.{p}" for m in ("adapter_1", "layer_1") for p in WB}
    return keys | {P + f"mask_features.{p}" for p in WB}


def official_fpn_keys() -> set[str]:
    keys = {P + f"layer_{i}.weight" for i in range(1, 5)} | {P + f"layer_{i}.norm.{p}" for i in range(1, 5) for p in WB}
    keys |= {P + f"adapter_{i}.weight" for i in range(1, 4)}
    keys |= {P + f"adapter_{i}.norm.{p}" for i in range(1, 4) for p in WB}
    return keys | {P + f"mask_features.{p}" for p in WB}


def official_masked_decoder_keys(layers) -> set[str]:
    keys = {D + "query_feat.weight", D + "query_embed.weight", D + "level_embed.weight", "criterion.empty_weight"}
    keys |= {D + f"{m}.{p}" for m in ("decoder_norm", "class_embed", "mask_embed.layers.0", "mask_embed.layers.1",
                                       "mask_embed.layers.2") for p in WB}
    for i in range(layers):
        keys |= {f"{D}transformer_self_attention_layers.{i}.self_attn.{a}" for a in ATTN}
        keys |= {f"{D}transformer_cross_attention_layers.{i}.multihead_attn.{a}" for a in ATTN}
        kinds = ("self_attention", "cross_attention", "ffn")
        keys |= {f"{D}transformer_{kind}_layers.{i}.norm.{p}" for kind in kinds for p in WB}
        keys |= {f"{D}transformer_ffn_layers.{i}.{m}.{p}" for m in ("linear1", "linear2") for p in WB}
    return keys


def official_standard_decoder_keys(layers) -> set[str]:
    keys = {D + "query_embed.weight", "criterion.empty_weight"} | {D + f"input_proj.{p}" for p in WB}
    keys |= {D + f"{m}.{p}" for m in ("transformer.decoder.norm", "class_embed", "mask_embed.layers.0",
                                       "mask_embed.layers.1", "mask_embed.layers.2") for p in WB}
    for i in range(layers):
        prefix = f"{D}transformer.decoder.layers.{i}."
        keys |= {prefix + "self_attn." + a for a in ATTN} | {prefix + "multihead_attn." + a for a in ATTN}
        keys |= {prefix + m + "." + p for m in ("linear1", "linear2", "norm1", "norm2", "norm3") for p in WB}
    return keys


# ----- helpers ------------------------------------------------------------------------------------------


def write_pkl(path, state: dict) -> str:
    with open(path, "wb") as file:
        pickle.dump({"model": state, "__author__": "test"}, file)
    return str(path)


def write_preset(path, config: ModelConfig) -> str:
    # test: the preset's semantic post-processing order, which the converter copies into the model config.
    test = {"semantic_postprocess_before_inference": config.semantic_postprocess_before_inference}
    path.write_text(yaml.safe_dump({"model": to_dict(config), "test": test}))
    return str(path)


def outputs(model, images):
    with torch.no_grad():
        out = model.eval()(images)
    return [out.pred_logits, out.pred_masks] + [t for aux in out.aux_outputs for t in aux.values()]


def assert_same_outputs(a, b, images):
    for x, y in zip(outputs(a, images), outputs(b, images), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def randomise_buffers(model):
    """Fresh models have unit batch-norm statistics; make them informative so a mix-up would show."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    model = Mask2Former(r50_config()).eval()
    randomise_buffers(model)
    return model


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(1)
    return Mask2Former(tiny_swin_config()).eval()


# ----- round trips --------------------------------------------------------------------------------------


def test_r50_round_trip_through_the_official_layout(r50, tmp_path):
    state = to_detectron2_state_dict(r50)
    assert set(state) == official_resnet_keys() | official_msdeformattn_keys(1) | official_masked_decoder_keys(3)
    # Shapes the reference would have (hidden 64, res2..res5 = 256..2048 channels, encoder levels res5 first).
    assert state["backbone.res2.0.shortcut.weight"].shape == (256, 64, 1, 1)
    assert state["backbone.res3.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert state[P + "input_proj.0.0.weight"].shape == (64, 2048, 1, 1)
    assert state[P + "input_proj.2.0.weight"].shape == (64, 512, 1, 1)
    assert state[P + "adapter_1.weight"].shape == (64, 256, 1, 1)
    assert state[P + "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].shape == (8 * 3 * 4 * 2, 64)
    assert state[D + "class_embed.weight"].shape == (6, 64)
    assert state[D + "transformer_cross_attention_layers.2.multihead_attn.in_proj_weight"].shape == (192, 64)
    np.testing.assert_allclose(state["criterion.empty_weight"], [1, 1, 1, 1, 1, 0.1])

    path = write_pkl(tmp_path / "model_final_r50.pkl", state)
    images = torch.randn(1, 3, 64, 64)
    loaded = Mask2Former.from_pretrained(path, config=write_preset(tmp_path / "tiny_r50.yaml", r50.config))
    assert loaded.config == r50.config
    assert_same_outputs(r50, loaded, images)
    # Without a config every field that shapes the model is read from the tensors.
    inferred, _, labels = convert_detectron2_checkpoint(path)
    assert inferred == r50.config
    assert labels is None


def test_swin_round_trip_ignores_the_relative_position_index(swin, tmp_path):
    state = to_detectron2_state_dict(swin)
    expected = official_swin_keys((2, 2, 2, 2)) | official_msdeformattn_keys(2) | official_masked_decoder_keys(3)
    assert set(state) == expected
    assert state["backbone.layers.0.blocks.0.attn.relative_position_index"].shape == (16, 16)
    assert state["backbone.norm3.weight"].shape == (256,)
    assert state["backbone.layers.2.downsample.reduction.weight"].shape == (256, 512)
    path = write_pkl(tmp_path / "model_final_swin.pkl", state)
    preset = write_preset(tmp_path / "tiny_swin.yaml", swin.config)
    images = torch.randn(1, 3, 64, 96)  # not a multiple of the window at any stage
    assert_same_outputs(swin, Mask2Former.from_pretrained(path, config=preset), images)

    # The index is derived from the window size; a file with another one is not silently accepted.
    state["backbone.layers.1.blocks.1.attn.relative_position_index"] = np.zeros((16, 16), dtype=np.int64)
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.1\.blocks\.1\.attn\.relative_position_index"):
        Mask2Former.from_pretrained(write_pkl(tmp_path / "bad.pkl", state), config=preset)


def test_maskformer_v1_round_trip(tmp_path):
    model = Mask2Former(v1_config()).eval()
    state = to_detectron2_state_dict(model)
    assert set(state) == official_swin_keys((2, 2, 2, 2)) | official_fpn_keys() | official_standard_decoder_keys(2)
    assert state[P + "mask_features.weight"].shape == (64, 64, 3, 3)  # 3x3 in MaskFormer
    assert state[P + "layer_4.weight"].shape == (64, 256, 3, 3)  # res5 output conv, no adapter
    assert state[D + "input_proj.weight"].shape == (64, 256, 1, 1)  # res5 (256 ch) -> hidden 64
    path = write_pkl(tmp_path / "model_final_maskformer.pkl", state)
    loaded = Mask2Former.from_pretrained(path, config=write_preset(tmp_path / "v1.yaml", model.config))
    assert_same_outputs(model, loaded, torch.randn(1, 3, 64, 64))


def test_mp_former_layout(tmp_path):
    """MP-Former's released decoder: no query positional embedding, a label embedding (label_enc) for the piloting
    queries; here also with the decoder's optional input projections (ENFORCE_INPUT_PROJ)."""
    config = tiny_swin_config(num_heads=8, query_pos=False, mask_piloting=True, enforce_input_proj=True)
    model = Mask2Former(config).eval()
    state = to_detectron2_state_dict(model)
    expected = official_swin_keys((2, 2, 2, 2)) | official_msdeformattn_keys(2) | official_masked_decoder_keys(3)
    expected = (expected - {D + "query_embed.weight"}) | {D + "label_enc.weight"}
    expected |= {f"{D}input_proj.{i}.{p}" for i in range(3) for p in WB}
    assert set(state) == expected and state[D + "label_enc.weight"].shape == (5, 64)
    path = write_pkl(tmp_path / "model_final_mp_former.pkl", state)
    inferred, _, _ = convert_detectron2_checkpoint(path)
    assert (inferred.query_pos, inferred.mask_piloting, inferred.enforce_input_proj) == (False, True, True)
    assert_same_outputs(model, Mask2Former.from_pretrained(path), torch.randn(1, 3, 64, 64))
    with pytest.raises(CheckpointError, match=rf"mask_piloting is True in the file \({D}label_enc\.weight\) but False"):
        convert_detectron2_checkpoint(path, dataclasses.replace(config, mask_piloting=False))


def test_pth_and_legacy_key_spellings(swin, tmp_path):
    state = to_detectron2_state_dict(swin)
    preset = write_preset(tmp_path / "tiny_swin.yaml", swin.config)
    # A detectron2 training checkpoint (.pth, tensors) saved from a DDP-wrapped model.
    path = tmp_path / "model_0004999.pth"
    torch.save({"model": {"module." + k: torch.from_numpy(v) for k, v in state.items()}, "iteration": 4999}, path)
    images = torch.randn(1, 3, 64, 64)
    assert_same_outputs(swin, Mask2Former.from_pretrained(path, config=preset), images)
    # Before version 2 of the reference head the pixel decoder sat directly under sem_seg_head, and the query
    # features were called static_query.
    legacy = {k.replace(P, "sem_seg_head.").replace("query_feat", "static_query"): v for k, v in state.items()}
    assert "sem_seg_head.adapter_1.weight" in legacy and D + "static_query.weight" in legacy
    old = write_pkl(tmp_path / "old.pkl", legacy)
    assert_same_outputs(swin, Mask2Former.from_pretrained(old, config=preset), images)


def test_torch_tensor_pickle_and_detection_checkpointer_pth(swin, tmp_path):
    """detectron2 checkpoints holding torch tensors: a plain ``.pkl`` of them (as pickle.dump of a state dict
    writes it) and the ``model_final.pth`` that DetectionCheckpointer saves (``torch.save`` of the model, optimizer,
    scheduler and iteration) give the same model as the numpy ``.pkl``."""
    state = to_detectron2_state_dict(swin)
    preset = write_preset(tmp_path / "tiny_swin.yaml", swin.config)
    images = torch.randn(1, 3, 64, 64)
    tensors = {key: torch.from_numpy(value) for key, value in state.items()}
    assert_same_outputs(swin, Mask2Former.from_pretrained(write_pkl(tmp_path / "tensors.pkl", tensors), config=preset),
                        images)

    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([parameter], lr=1e-4, weight_decay=0.05)
    parameter.grad = torch.ones(3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    document = {"model": tensors, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "iteration": 89999}
    path = tmp_path / "model_final.pth"
    torch.save(document, path)
    assert_same_outputs(swin, Mask2Former.from_pretrained(path, config=preset), images)

    # torch.load(weights_only=True) refuses an object it does not know, with one line naming the file and the global.
    torch.save({**document, "scheduler": scheduler}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"model_final\.pth: torch\.load\(weights_only=True\) refused the "
                                                   r"file \(.*StepLR") as error:
        Mask2Former.from_pretrained(path, config=preset)
    assert "\n" not in str(error.value)


def test_save_detectron2_checkpoint_writes_a_detectron2_pickle(swin, tmp_path):
    path = tmp_path / "exported.pkl"
    save_detectron2_checkpoint(swin, path)
    with open(path, "rb") as file:
        document = pickle.load(file)
    assert set(document) >= {"model", "__author__"}
    assert document["model"].keys() == to_detectron2_state_dict(swin).keys()


# ----- refusals and mismatches --------------------------------------------------------------------------


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_asking_for_another_global_is_refused(swin, tmp_path):
    marker = tmp_path / "pwned"
    state = dict(to_detectron2_state_dict(swin))
    state[D + "query_feat.weight"] = RunsACommand(marker)
    path = write_pkl(tmp_path / "model_final_evil.pkl", state)
    refused = rf"model_final_evil\.pkl: refusing to unpickle {os.system.__module__}\.system"
    with pytest.raises(UnsafeCheckpointError, match=refused):
        Mask2Former.from_pretrained(path, config=write_preset(tmp_path / "tiny.yaml", swin.config))
    assert not marker.exists()


def test_another_class_count_loads_all_but_the_class_head(swin, tmp_path):
    config = dataclasses.replace(swin.config, num_classes=7)
    torch.manual_seed(2)
    source = Mask2Former(config).eval()
    path = write_pkl(tmp_path / "seven_classes.pkl", to_detectron2_state_dict(source))
    with pytest.warns(UserWarning, match="7 classes, the model 5"):
        loaded = Mask2Former.from_pretrained(path, config=write_preset(tmp_path / "five.yaml", swin.config))
    assert loaded.num_classes == 5
    expected, got = source.state_dict(), loaded.state_dict()
    head = {"transformer_decoder.heads.class_embed.weight", "transformer_decoder.heads.class_embed.bias"}
    assert got["transformer_decoder.heads.class_embed.weight"].shape == (6, 64)
    for key in expected.keys() - head:
        assert torch.equal(expected[key], got[key]), key
    # Same through the num_classes argument, without a preset.
    with pytest.warns(UserWarning, match="class head"):
        three = Mask2Former.from_pretrained(path, config=write_preset(tmp_path / "seven.yaml", config), num_classes=3)
    assert three.num_classes == 3


def test_a_tensor_with_a_wrong_shape_is_named(swin, tmp_path):
    state = dict(to_detectron2_state_dict(swin))
    state[D + "mask_embed.layers.1.weight"] = np.zeros((64, 32), dtype=np.float32)
    path = write_pkl(tmp_path / "bad_shape.pkl", state)
    with pytest.raises(CheckpointError, match=r"mask_embed\.layers\.1\.weight has shape \(64, 32\)"):
        Mask2Former.from_pretrained(path, config=write_preset(tmp_path / "tiny.yaml", swin.config))


def test_checkpoint_and_config_must_agree(r50, swin, tmp_path):
    path = write_pkl(tmp_path / "model_final_r50.pkl", to_detectron2_state_dict(r50))
    # The real preset has the reference widths: every disagreement is listed on one line.
    with pytest.raises(CheckpointError) as error:
        convert_detectron2_checkpoint(path, "coco_panoptic_r50")
    message = str(error.value)
    assert "\n" not in message and "config 'coco_panoptic_r50'" in message
    assert f"num_queries is 6 in the file ({D}query_feat.weight) but 100" in message
    assert "hidden_dim is 64" in message and "dec_layers is 3" in message
    with pytest.raises(CheckpointError, match="has a resnet50 backbone .* but the given model config uses swin_tiny"):
        convert_detectron2_checkpoint(path, dataclasses.replace(swin.config, num_classes=5))
    swin_path = write_pkl(tmp_path / "model_final_swin.pkl", to_detectron2_state_dict(swin))
    with pytest.raises(CheckpointError, match=r"Swin embed_dim is 32 in the file but 96"):
        convert_detectron2_checkpoint(swin_path, "coco_panoptic_swin_tiny")


def test_unexpected_and_missing_tensors(swin, tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml", swin.config)
    state = dict(to_detectron2_state_dict(swin))
    state[D + "extra_head.weight"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(CheckpointError, match=rf"unexpected tensor {D}extra_head\.weight"):
        Mask2Former.from_pretrained(write_pkl(tmp_path / "extra.pkl", state), config=preset)
    del state[D + "extra_head.weight"]
    del state[D + "level_embed.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        Mask2Former.from_pretrained(write_pkl(tmp_path / "missing.pkl", state), config=preset)
    with pytest.raises(CheckpointError, match="not a numeric array"):
        Mask2Former.from_pretrained(write_pkl(tmp_path / "text.pkl", {**state, "note": "hello"}), config=preset)


# ----- the official names mean what transformers' conversion script says they mean ---------------------

SWIN = r"model\.pixel_level_module\.encoder\.swin\."
BLOCK = SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
PIXEL_HF = r"model\.pixel_level_module\.decoder\."
ENCODER_HF = PIXEL_HF + r"encoder\.layers\.(\d+)\."
LAYER_HF = r"model\.transformer_module\.decoder\.layers\.(\d+)\."
# transformers 5 in-memory names -> official names, per convert_mask2former_original_pytorch_checkpoint_to_pytorch.py
# (layernorm_before = norm1, self_attn_layer_norm = norm1 / the self-attention norm, fc1 = linear1, ...).
HF_TO_OFFICIAL = [
    (SWIN + r"embeddings\.patch_embeddings\.projection\.(\w+)", r"backbone.patch_embed.proj.\1"),
    (SWIN + r"embeddings\.norm\.(\w+)", r"backbone.patch_embed.norm.\1"),
    (BLOCK + r"layernorm_before\.(\w+)", r"backbone.layers.\1.blocks.\2.norm1.\3"),
    (BLOCK + r"layernorm_after\.(\w+)", r"backbone.layers.\1.blocks.\2.norm2.\3"),
    (BLOCK + r"attention\.o_proj\.(\w+)", r"backbone.layers.\1.blocks.\2.attn.proj.\3"),
    (BLOCK + r"attention\.relative_position_bias\.(relative_position_bias_table)",
     r"backbone.layers.\1.blocks.\2.attn.\3"),
    (BLOCK + r"mlp\.(fc\d)\.(\w+)", r"backbone.layers.\1.blocks.\2.mlp.\3.\4"),
    (SWIN + r"encoder\.layers\.(\d+)\.downsample\.(\w+)\.(\w+)", r"backbone.layers.\1.downsample.\2.\3"),
    (r"model\.pixel_level_module\.encoder\.hidden_states_norms\.stage(\d)\.(\w+)",
     lambda m: f"backbone.norm{int(m[1]) - 1}.{m[2]}"),
    (PIXEL_HF + r"level_embed", P + "transformer.level_embed"),
    (PIXEL_HF + r"input_projections\.(\d)\.(\d)\.(\w+)", P + r"input_proj.\1.\2.\3"),
    (ENCODER_HF + r"self_attn\.(\w+)\.(\w+)", P + r"transformer.encoder.layers.\1.self_attn.\2.\3"),
    (ENCODER_HF + r"self_attn_layer_norm\.(\w+)", P + r"transformer.encoder.layers.\1.norm1.\2"),
    (ENCODER_HF + r"fc1\.(\w+)", P + r"transformer.encoder.layers.\1.linear1.\2"),
    (ENCODER_HF + r"fc2\.(\w+)", P + r"transformer.encoder.layers.\1.linear2.\2"),
    (ENCODER_HF + r"final_layer_norm\.(\w+)", P + r"transformer.encoder.layers.\1.norm2.\2"),
    (PIXEL_HF + r"mask_projection\.(\w+)", P + r"mask_features.\1"),
    (PIXEL_HF + r"(adapter_1|layer_1)\.0\.weight", P + r"\1.weight"),
    (PIXEL_HF + r"(adapter_1|layer_1)\.1\.(\w+)", P + r"\1.norm.\2"),
    (r"model\.transformer_module\.queries_embedder\.weight", D + "query_embed.weight"),
    (r"model\.transformer_module\.queries_features\.weight", D + "query_feat.weight"),
    (r"model\.transformer_module\.level_embed\.weight", D + "level_embed.weight"),
    (LAYER_HF + r"self_attn\.out_proj\.(\w+)", D + r"transformer_self_attention_layers.\1.self_attn.out_proj.\2"),
    (LAYER_HF + r"self_attn_layer_norm\.(\w+)", D + r"transformer_self_attention_layers.\1.norm.\2"),
    (LAYER_HF + r"cross_attn\.(.+)", D + r"transformer_cross_attention_layers.\1.multihead_attn.\2"),
    (LAYER_HF + r"cross_attn_layer_norm\.(\w+)", D + r"transformer_cross_attention_layers.\1.norm.\2"),
    (LAYER_HF + r"fc(\d)\.(\w+)", D + r"transformer_ffn_layers.\1.linear\2.\3"),
    (LAYER_HF + r"final_layer_norm\.(\w+)", D + r"transformer_ffn_layers.\1.norm.\2"),
    (r"model\.transformer_module\.decoder\.layernorm\.(\w+)", D + r"decoder_norm.\1"),
    (r"model\.transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(\w+)",
     D + r"mask_embed.layers.\1.\2"),
    (r"class_predictor\.(\w+)", D + r"class_embed.\1"),
    (r"criterion\.empty_weight", "criterion.empty_weight"),
]
# Query/key/value projections that the reference keeps fused (Swin qkv, nn.MultiheadAttention in_proj).
HF_FUSED = [
    (BLOCK + r"attention\.([qkv])_proj\.(\w+)", lambda m: f"backbone.layers.{m[1]}.blocks.{m[2]}.attn.qkv.{m[4]}"),
    (LAYER_HF + r"self_attn\.([qkv])_proj\.(\w+)",
     lambda m: f"{D}transformer_self_attention_layers.{m[1]}.self_attn.in_proj_{m[3]}"),
]


def hf_to_official(hf_state: dict, renames: list, fused_renames: list, skip: str) -> dict:
    official, fused = {}, {}
    for key, value in hf_state.items():
        if re.fullmatch(skip, key):
            continue
        for pattern, target in fused_renames:
            if match := re.fullmatch(pattern, key):
                fused.setdefault(target(match), {})["qkv".index(match[len(match.groups()) - 1])] = value
                break
        else:
            for pattern, target in renames:
                if match := re.fullmatch(pattern, key):
                    official[target(match) if callable(target) else match.expand(target)] = value.numpy()
                    break
            else:
                raise AssertionError(f"no official name for {key}")
    for name, parts in fused.items():
        official[name] = torch.cat([parts[0], parts[1], parts[2]]).numpy()
    return official


def randomise(model, seed):
    """Unit-scale random weights and BN statistics: transformers' initialisation gives near-constant outputs, which
    would hide a swapped norm or projection."""
    return randomise_unit_scale(model, seed, spread=0.3, buffers=True)


def informative_hf_mask2former():
    """A tiny transformers Mask2Former with 8 heads, like the reference."""
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinConfig(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7,
                                   drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, hidden_dim=64, feature_size=64, mask_feature_size=64, num_queries=10,
        decoder_layers=4, encoder_layers=2, num_attention_heads=8, dim_feedforward=128, encoder_feedforward_dim=128,
        num_labels=5,
    )
    return randomise(transformers.Mask2FormerForUniversalSegmentation(config).eval(), seed=3)


def test_mask2former_names_mean_what_the_transformers_conversion_says(tmp_path):
    hf_model = informative_hf_mask2former()
    official = hf_to_official(hf_model.state_dict(), HF_TO_OFFICIAL, HF_FUSED, skip=SWIN + r"layernorm\.\w+")
    expected = official_swin_keys((2, 2, 2, 2)) | official_msdeformattn_keys(2) | official_masked_decoder_keys(3)
    assert set(official) == {k for k in expected if not k.endswith("relative_position_index")}
    path = write_pkl(tmp_path / "model_final_from_hf.pkl", official)
    ours = Mask2Former.from_pretrained(path)  # 8 heads: the shapes alone determine the model
    assert ours.config.backbone.kwargs == dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7)
    images = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(4))  # stages smaller than a window too
    with torch.no_grad():
        theirs = hf_model(pixel_values=images, output_auxiliary_logits=True)
    their_outputs = [theirs.class_queries_logits, theirs.masks_queries_logits]
    for aux in theirs.auxiliary_logits:
        their_outputs += [aux["class_queries_logits"], aux["masks_queries_logits"]]
    assert their_outputs[1].std() > 0.5 and their_outputs[0].std() > 0.3  # informative outputs
    for mine, reference in zip(outputs(ours, images), their_outputs, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=0)


RESNET_HF = r"model\.pixel_level_module\.encoder\."
STAGE_HF = RESNET_HF + r"encoder\.stages\.(\d)\.layers\.(\d+)\."
FPN_HF = r"model\.pixel_level_module\.decoder\."
DETR_HF = r"model\.transformer_module\.decoder\.layers\.(\d+)\."
DETR = D + "transformer.decoder.layers."
# transformers 5 MaskFormer names -> official names, per convert_maskformer_resnet_to_pytorch.py. That script reads
# the MaskFormer model zoo pickles directly, whose pixel decoder sits under sem_seg_head. (the pre-version-2 layout).
MASKFORMER_HF_TO_OFFICIAL = [
    (RESNET_HF + r"embedder\.embedder\.convolution\.weight", "backbone.stem.conv1.weight"),
    (RESNET_HF + r"embedder\.embedder\.normalization\.(\w+)", r"backbone.stem.conv1.norm.\1"),
    (STAGE_HF + r"shortcut\.convolution\.weight", lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut.weight"),
    (STAGE_HF + r"shortcut\.normalization\.(\w+)",
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut.norm.{m[3]}"),
    (STAGE_HF + r"layer\.(\d)\.convolution\.weight",
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.weight"),
    (STAGE_HF + r"layer\.(\d)\.normalization\.(\w+)",
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.norm.{m[4]}"),
    (FPN_HF + r"fpn\.stem\.0\.weight", "sem_seg_head.layer_4.weight"),
    (FPN_HF + r"fpn\.stem\.1\.(\w+)", r"sem_seg_head.layer_4.norm.\1"),
    (FPN_HF + r"fpn\.layers\.(\d)\.proj\.0\.weight", lambda m: f"sem_seg_head.adapter_{3 - int(m[1])}.weight"),
    (FPN_HF + r"fpn\.layers\.(\d)\.proj\.1\.(\w+)", lambda m: f"sem_seg_head.adapter_{3 - int(m[1])}.norm.{m[2]}"),
    (FPN_HF + r"fpn\.layers\.(\d)\.block\.0\.weight", lambda m: f"sem_seg_head.layer_{3 - int(m[1])}.weight"),
    (FPN_HF + r"fpn\.layers\.(\d)\.block\.1\.(\w+)", lambda m: f"sem_seg_head.layer_{3 - int(m[1])}.norm.{m[2]}"),
    (FPN_HF + r"mask_projection\.(\w+)", r"sem_seg_head.mask_features.\1"),
    (DETR_HF + r"self_attn\.o_proj\.(\w+)", DETR + r"\1.self_attn.out_proj.\2"),
    (DETR_HF + r"encoder_attn\.o_proj\.(\w+)", DETR + r"\1.multihead_attn.out_proj.\2"),
    (DETR_HF + r"mlp\.fc(\d)\.(\w+)", DETR + r"\1.linear\2.\3"),
    (DETR_HF + r"self_attn_layer_norm\.(\w+)", DETR + r"\1.norm1.\2"),
    (DETR_HF + r"encoder_attn_layer_norm\.(\w+)", DETR + r"\1.norm2.\2"),
    (DETR_HF + r"final_layer_norm\.(\w+)", DETR + r"\1.norm3.\2"),
    (r"model\.transformer_module\.decoder\.layernorm\.(\w+)", D + r"transformer.decoder.norm.\1"),
    (r"model\.transformer_module\.queries_embedder\.weight", D + "query_embed.weight"),
    (r"model\.transformer_module\.input_projection\.(\w+)", D + r"input_proj.\1"),
    (r"class_predictor\.(\w+)", D + r"class_embed.\1"),
    (r"mask_embedder\.(\d)\.0\.(\w+)", D + r"mask_embed.layers.\1.\2"),
    (r"criterion\.empty_weight", "criterion.empty_weight"),
]
MASKFORMER_HF_FUSED = [
    (DETR_HF + r"self_attn\.([qkv])_proj\.(\w+)", lambda m: f"{DETR}{m[1]}.self_attn.in_proj_{m[3]}"),
    (DETR_HF + r"encoder_attn\.([qkv])_proj\.(\w+)", lambda m: f"{DETR}{m[1]}.multihead_attn.in_proj_{m[3]}"),
]


def test_maskformer_resnet50_names_mean_what_the_transformers_conversion_says(tmp_path):
    transformers = pytest.importorskip("transformers")
    resnet = transformers.ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                                       layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"])
    detr = transformers.DetrConfig(d_model=64, decoder_layers=2, decoder_attention_heads=8, decoder_ffn_dim=96,
                                   num_queries=6, encoder_layers=0)
    config = transformers.MaskFormerConfig(backbone_config=resnet, decoder_config=detr, fpn_feature_size=64,
                                           mask_feature_size=64, num_labels=5)
    hf_model = randomise(transformers.MaskFormerForInstanceSegmentation(config).eval(), seed=5)
    # FrozenBN (the reference's R50 setting) has no update counters.
    official = hf_to_official(hf_model.state_dict(), MASKFORMER_HF_TO_OFFICIAL, MASKFORMER_HF_FUSED,
                              skip=r".*\.num_batches_tracked")
    modern = {key if key.startswith((D, "sem_seg_head.predictor", "backbone", "criterion")) else
              key.replace("sem_seg_head.", P, 1) for key in official}
    assert modern == official_resnet_keys() | official_fpn_keys() | official_standard_decoder_keys(2)
    ours = Mask2Former.from_pretrained(write_pkl(tmp_path / "model_final_maskformer_r50.pkl", official))
    assert (ours.config.backbone.name, ours.config.backbone.freeze_bn) == ("resnet50", True)
    layout = (ours.config.pixel_decoder, ours.config.transformer_decoder, ours.config.dec_layers)
    assert layout == ("fpn", "standard", 2)
    images = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        theirs = hf_model(pixel_values=images)
    # Final outputs only: with auxiliary outputs on, transformers' MaskFormer feeds the layer-normed queries into
    # the next layer, which the reference (DETR's decoder) does not.
    their_outputs = [theirs.class_queries_logits, theirs.masks_queries_logits]
    assert their_outputs[1].std() > 0.5 and their_outputs[0].std() > 0.3  # informative outputs
    for mine, reference in zip(outputs(ours, images)[:2], their_outputs, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=0)
