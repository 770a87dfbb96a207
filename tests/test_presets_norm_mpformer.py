"""Backbone norm option (FrozenBN | BN | SyncBN, with the legacy ``freeze_bn``) and the MP-Former presets."""

import pytest
import torch

from mask2former.config import BackboneConfig, ConfigError, from_dict, load_config, to_dict
from mask2former.modeling.model import Mask2Former

from test_train import TINY


def test_norm_and_legacy_freeze_bn():
    assert (BackboneConfig().norm, BackboneConfig().freeze_bn) == ("FrozenBN", True)
    assert (BackboneConfig(freeze_bn=False).norm, BackboneConfig(freeze_bn=True).norm) == ("BN", "FrozenBN")
    for norm, frozen in (("FrozenBN", True), ("BN", False), ("SyncBN", False)):
        config = BackboneConfig(norm=norm)
        assert config.freeze_bn is frozen
        assert from_dict(BackboneConfig, to_dict(config)) == config  # saved configs load back
    # Older YAML / checkpoints: freeze_bn only.
    assert from_dict(BackboneConfig, {"name": "resnet50", "freeze_bn": False}).norm == "BN"
    with pytest.raises(ConfigError, match="freeze_bn=true contradicts model.backbone.norm=SyncBN"):
        BackboneConfig(norm="SyncBN", freeze_bn=True)
    with pytest.raises(ConfigError, match="norm must be one of FrozenBN, BN, SyncBN, got 'GN'"):
        BackboneConfig(norm="GN")


def test_reference_norms_in_presets():
    # Cityscapes configs: RESNETS.NORM "SyncBN"; COCO / ADE20K R50: detectron2's default FrozenBN.
    assert load_config("cityscapes_panoptic_r50").model.backbone.norm == "SyncBN"
    assert load_config("cityscapes_semantic_r50").model.backbone.norm == "SyncBN"
    assert load_config("coco_panoptic_r50").model.backbone.norm == "FrozenBN"
    assert load_config("ade20k_semantic_r50").model.backbone.norm == "FrozenBN"
    assert load_config("fashion_scenes_lite0").model.backbone.norm == "FrozenBN"
    # A trainable-BN backbone under SyncBN is built with ordinary batch norms (converted when wrapped in DDP).
    config = load_config("cityscapes_panoptic_r50").model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in Mask2Former(config).backbone.modules())


def test_mpformer_presets():
    default = load_config("fashion_scenes_lite0")
    mp = load_config("fashion_scenes_mpformer")
    assert default.model.query_pos is True and default.mask_piloting.enabled
    assert mp.model.query_pos is False and mp.mask_piloting.enabled
    # Nothing else differs from the default recipe (but the output directory).
    mp_dict, default_dict = to_dict(mp), to_dict(default)
    mp_dict["model"]["query_pos"] = True
    mp_dict["train"]["output_dir"] = default_dict["train"]["output_dir"]
    assert mp_dict == default_dict
    coco = load_config("coco_instance_r50_mpformer")
    assert (coco.model.query_pos, coco.mask_piloting.enabled, coco.mask_piloting.num_groups,
            coco.mask_piloting.label_noise, coco.mask_piloting.point_noise, coco.mask_piloting.all_layers) == (
        False, True, 1, 0.2, 0.0, True)
    assert coco.data.dataset == "coco" and coco.test.task == "instance"


def test_mpformer_preset_trains_two_iterations(tmp_path):
    from mask2former.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", "fashion_scenes_mpformer", *TINY, f"train.output_dir={tmp_path}"]) == 0
    finally:
        torch.set_num_threads(threads)
    model = Mask2Former.from_pretrained(tmp_path / "model_final")
    assert model.config.query_pos is False and model.config.mask_piloting is True
    assert model.transformer_decoder.query_embed is None and model.transformer_decoder.label_embed is not None
