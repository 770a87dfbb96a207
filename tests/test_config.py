import pytest

from mask2former.config import PRESET_DIR, Config, ConfigError, load_config, save_config, to_dict, from_dict


def test_defaults_are_the_official_yaml_values():
    config = Config()
    assert config.model.dec_layers == 9 and config.model.num_queries == 100 and config.model.enc_ffn_dim == 1024
    assert (config.loss.class_weight, config.loss.mask_weight, config.loss.dice_weight) == (2.0, 5.0, 5.0)
    assert config.loss.num_points == 12544 and config.solver.clip_grad_norm == 0.01


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_")))
def test_every_preset_loads(preset):
    config = load_config(preset)
    assert config.model.num_classes > 0


def test_swin_large_panoptic_uses_200_queries_and_semantic_100():
    assert load_config("coco_panoptic_swin_large").model.num_queries == 200
    assert load_config("ade20k_semantic_swin_large").model.num_queries == 100
    assert load_config("coco_instance_r50").model.num_classes == 80


def test_overrides_and_round_trip(tmp_path):
    config = load_config("coco_panoptic_r50", ["model.num_queries=50", "solver.base_lr=2e-4", "data.crop_size=[64, 64]"])
    assert config.model.num_queries == 50 and config.solver.base_lr == 2e-4 and config.data.crop_size == (64, 64)
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    assert from_dict(Config, to_dict(config)) == config


def test_unknown_key_and_bad_type_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown config key model.num_querys"):
        load_config("coco_panoptic_r50", ["model.num_querys=5"])
    with pytest.raises(ConfigError, match="model.num_queries: expected int"):
        load_config("coco_panoptic_r50", ["model.num_queries=many"])
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset"):
        load_config("no_such_preset")
