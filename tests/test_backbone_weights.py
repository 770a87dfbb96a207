"""ImageNet backbone weights from files (model.backbone.weights): each layout is written from a source model with
random weights, and the mapping is proven by our backbone's features equalling the source model's."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
import yaml
from safetensors.torch import save_file
from timm.models.swin_transformer import checkpoint_filter_fn

from mask2former.apps.train import run_train
from mask2former.cli import main
from mask2former.config import BackboneConfig, load_config
from mask2former.interop.backbone_weights import (
    WEIGHTS_DIR_ENV,
    BackboneWeightsError,
    load_backbone_weights,
    resolve_weights,
)
from mask2former.modeling.backbone import Backbone, skip_imagenet_weights
from mask2former.modeling.build import check_backbone_weights
from mask2former.modeling.model import Mask2Former

TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


# ------------------------------------------------------------------------------------------------ source models
def _torchvision_to_detectron2(state: dict) -> dict:
    """What detectron2's tools/convert-torchvision-to-d2.py writes (its renaming rules, numpy arrays)."""
    renamed = {}
    for key, value in state.items():
        name = key if "layer" in key else "stem." + key
        for stage in (1, 2, 3, 4):
            name = name.replace(f"layer{stage}", f"res{stage + 1}")
        for index in (1, 2, 3):
            name = name.replace(f"bn{index}", f"conv{index}.norm")
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        renamed[name] = value.detach().numpy()
    return renamed


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A torchvision ResNet-50 with random weights and batch-norm statistics, saved in every ResNet layout."""
    torch.manual_seed(1)
    model = torchvision.models.resnet50().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("resnet")
    state = model.state_dict()
    torch.save(state, folder / "resnet50.pth")
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / "resnet50.safetensors"))
    with open(folder / "R-50.pkl", "wb") as file:
        pickle.dump({"model": _torchvision_to_detectron2(state), "__author__": "torchvision",
                     "matching_heuristics": True}, file)
    return model, folder


def _torchvision_features(model, images):
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    features = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        features.append(x)
    return features


def _official_swin_state(embed_dim, depths, heads, window, num_classes, image=224, seed=0) -> dict:
    """A state dict as the official Swin classifier (microsoft/Swin-Transformer) names and shapes it, with random
    values: patch merging at the end of stages 0-2, relative_position_index and attn_mask buffers, final norm, head."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    state = {"patch_embed.proj.weight": rand(embed_dim, 3, 4, 4), "patch_embed.proj.bias": rand(embed_dim),
             "patch_embed.norm.weight": 1 + rand(embed_dim), "patch_embed.norm.bias": rand(embed_dim)}
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    index = relative[..., 0] * (2 * window - 1) + relative[..., 1]
    resolution = image // 4
    for stage, depth in enumerate(depths):
        dim = embed_dim * 2**stage
        for block in range(depth):
            prefix = f"layers.{stage}.blocks.{block}."
            state.update({
                prefix + "norm1.weight": 1 + rand(dim), prefix + "norm1.bias": rand(dim),
                prefix + "attn.relative_position_bias_table": rand((2 * window - 1) ** 2, heads[stage]),
                prefix + "attn.relative_position_index": index.clone(),
                prefix + "attn.qkv.weight": rand(3 * dim, dim), prefix + "attn.qkv.bias": rand(3 * dim),
                prefix + "attn.proj.weight": rand(dim, dim), prefix + "attn.proj.bias": rand(dim),
                prefix + "norm2.weight": 1 + rand(dim), prefix + "norm2.bias": rand(dim),
                prefix + "mlp.fc1.weight": rand(4 * dim, dim), prefix + "mlp.fc1.bias": rand(4 * dim),
                prefix + "mlp.fc2.weight": rand(dim, 4 * dim), prefix + "mlp.fc2.bias": rand(dim),
            })
            if block % 2 == 1 and resolution > window:  # shifted blocks keep their training-resolution mask
                windows = (resolution // window) ** 2
                state[prefix + "attn_mask"] = torch.zeros(windows, window * window, window * window)
        if stage < len(depths) - 1:
            prefix = f"layers.{stage}.downsample."
            state.update({prefix + "reduction.weight": rand(2 * dim, 4 * dim),
                          prefix + "norm.weight": 1 + rand(4 * dim), prefix + "norm.bias": rand(4 * dim)})
        resolution //= 2
    last = embed_dim * 2 ** (len(depths) - 1)
    state.update({"norm.weight": 1 + rand(last), "norm.bias": rand(last), "head.weight": rand(num_classes, last),
                  "head.bias": rand(num_classes)})
    return state


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    """An official-layout tiny Swin file, its Mask2Former .pkl and timm .safetensors versions, and timm's own
    SwinTransformer loaded from it with timm's converter (the oracle)."""
    folder = tmp_path_factory.mktemp("swin")
    state = _official_swin_state(TINY_SWIN["embed_dim"], TINY_SWIN["depths"], TINY_SWIN["num_heads"],
                                 TINY_SWIN["window_size"], num_classes=10)
    torch.save({"model": state}, folder / "swin_tiny_patch4_window7_224.pth")
    # Mask2Former's tools/convert-pretrained-swin-model-to-d2.py, line for line: torch tensors in a plain pickle.
    obj = torch.load(folder / "swin_tiny_patch4_window7_224.pth", map_location="cpu")["model"]
    res = {"model": obj, "__author__": "third_party", "matching_heuristics": True}
    with open(folder / "swin_tiny_patch4_window7_224.pkl", "wb") as f:
        pickle.dump(res, f)
    # The same names as numpy arrays (a converter run that called .numpy(), as detectron2's own converters do).
    with open(folder / "swin_numpy.pkl", "wb") as file:
        pickle.dump({"model": {key: value.numpy() for key, value in state.items()}, "__author__": "third_party",
                     "matching_heuristics": True}, file)
    peer = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, **TINY_SWIN).eval()
    peer.load_state_dict(checkpoint_filter_fn({"model": state}, peer), strict=True)
    save_file({key: value.contiguous() for key, value in peer.state_dict().items()}, str(folder / "timm.safetensors"))
    return peer, folder


# ---------------------------------------------------------------------------------------------- mapping proofs
@pytest.mark.parametrize("file", ["resnet50.pth", "resnet50.safetensors", "R-50.pkl"])
def test_resnet_layouts_reproduce_torchvision_features(resnet, file):
    model, folder = resnet
    backbone = Backbone(BackboneConfig(name="resnet50", pretrained=True, weights=str(folder / file))).eval()
    assert "loaded 318 tensors" in backbone.weights_report and "fc.weight" in backbone.weights_report
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours, expected = backbone(images), _torchvision_features(model, images)
    for level, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"res{level + 2}")


def test_timm_resnet50_uses_torchvision_names():
    with torch.device("meta"):
        timm_keys = set(timm.create_model("resnet50").state_dict())
        torchvision_keys = set(torchvision.models.resnet50().state_dict())
    assert timm_keys == torchvision_keys


@pytest.mark.parametrize("file", ["swin_tiny_patch4_window7_224.pth", "swin_tiny_patch4_window7_224.pkl",
                                  "swin_numpy.pkl", "timm.safetensors"])
def test_swin_layouts_reproduce_timm_features(swin, file):
    peer, folder = swin
    # adaptive_window: a 7x7 last stage is one unshifted window, as in the classification Swin that timm implements.
    config = BackboneConfig(name="swin_tiny", pretrained=True, weights=str(folder / file), drop_path_rate=0.0,
                            kwargs={**TINY_SWIN, "adaptive_window": True})
    backbone = Backbone(config).eval()
    report = backbone.weights_report
    assert "norms.N.weight (4)" in report  # the stage output norms are fresh, as in D2SwinTransformer
    if file != "timm.safetensors":
        assert "relative_position_index (8)" in report and "attn_mask (3)" in report and "head.weight" in report
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = backbone(images)
        stages = peer.forward_intermediates(images, indices=4, norm=False, intermediates_only=True)
    for level, (a, stage) in enumerate(zip(ours, stages)):
        # timm returns the stage outputs before any norm; ours pass fresh LayerNorms (weight 1, bias 0).
        expected = F.layer_norm(stage.permute(0, 2, 3, 1), (stage.shape[1],)).permute(0, 3, 1, 2)
        torch.testing.assert_close(a, expected, rtol=1e-4, atol=1e-4, msg=f"stage {level}")


def test_the_converted_swin_pkl_loads_into_the_preset_as_the_pth_does(swin, tmp_path, monkeypatch):
    """The Swin preset names ``swin_tiny_patch4_window7_224.pth``; a user who has only the converter's ``.pkl``
    gets the same backbone, tensor for tensor, and the same features."""
    _, folder = swin
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    config = load_config("coco_panoptic_swin_tiny", ["model.enc_layers=1", "model.dec_layers=1"]).model
    config.backbone.kwargs = {**TINY_SWIN, "num_heads": [1, 2, 4, 8]}
    assert config.backbone.weights == "swin_tiny_patch4_window7_224.pth" and config.backbone.pretrained
    backbones = {}
    for suffix in (".pth", ".pkl"):
        where = tmp_path / suffix[1:]
        where.mkdir()
        name = "swin_tiny_patch4_window7_224" + suffix
        (where / name).write_bytes((folder / name).read_bytes())
        monkeypatch.chdir(where)
        torch.manual_seed(0)
        backbones[suffix] = Mask2Former(config).backbone.eval()
        assert f"from {where / name} (Swin" in backbones[suffix].weights_report
    assert "pickle, __author__ 'third_party'" in backbones[".pkl"].weights_report
    from_pth, from_pkl = backbones[".pth"].state_dict(), backbones[".pkl"].state_dict()
    assert from_pth.keys() == from_pkl.keys()
    for key, value in from_pth.items():
        assert torch.equal(value, from_pkl[key]), key
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for a, b in zip(backbones[".pth"](images), backbones[".pkl"](images), strict=True):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------- refusals
def test_wrong_window_is_one_line_error(swin):
    _, folder = swin
    config = BackboneConfig(name="swin_tiny", pretrained=True, weights=str(folder / "swin_tiny_patch4_window7_224.pth"),
                            kwargs={**TINY_SWIN, "window_size": 12})
    with pytest.raises(BackboneWeightsError) as error:
        Backbone(config)
    message = str(error.value)
    assert "\n" not in message and "layers.0.blocks.0.attn.relative_position_bias_table" in message
    assert "(169, 1)" in message and "(529, 1)" in message and "window 7 in the file, 12" in message


def test_wrong_architecture_leaves_model_unchanged(resnet, tmp_path):
    """A file that fits except for its last tensor: error naming file, key and shapes, and nothing copied."""
    model, _ = resnet
    state = dict(model.state_dict())
    state["layer4.2.bn3.running_var"] = torch.ones(7)
    torch.save(state, tmp_path / "broken.pth")
    body = Backbone(BackboneConfig(name="resnet50")).body
    before = {key: value.clone() for key, value in body.state_dict().items()}
    with pytest.raises(BackboneWeightsError) as error:
        load_backbone_weights(body, "resnet50", tmp_path / "broken.pth", swin=False, head_keys={"fc.weight", "fc.bias"})
    message = str(error.value)
    assert str(tmp_path / "broken.pth") in message and "layer4.2.bn3.running_var" in message
    assert "(7,)" in message and "(2048,)" in message and "\n" not in message
    assert all(torch.equal(value, before[key]) for key, value in body.state_dict().items())
    # The intact file loads into the same body (so the refusal above was about that one tensor).
    torch.save(model.state_dict(), tmp_path / "intact.pth")
    load_backbone_weights(body, "resnet50", tmp_path / "intact.pth", swin=False, head_keys={"fc.weight", "fc.bias"})
    assert torch.equal(body.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"])


def test_other_architectures_and_layouts_are_refused(resnet, swin, tmp_path):
    _, resnet_folder = resnet
    _, swin_folder = swin
    r50 = str(resnet_folder / "R-50.pkl")
    with pytest.raises(BackboneWeightsError, match=r"no tensor for layer3\.6\.conv1\.weight \(256, 1024, 1, 1\)"):
        Backbone(BackboneConfig(name="resnet101", pretrained=True, weights=r50))
    with pytest.raises(BackboneWeightsError, match="needs Swin weights, the file holds ResNet"):
        Backbone(BackboneConfig(name="swin_tiny", pretrained=True, weights=r50, kwargs=TINY_SWIN))
    with pytest.raises(BackboneWeightsError, match="is a CNN, the file holds Swin"):
        Backbone(BackboneConfig(name="resnet50", pretrained=True,
                                weights=str(swin_folder / "swin_tiny_patch4_window7_224.pth")))
    # A Swin-T file into the Swin-T preset shape: the first tensor already differs.
    with pytest.raises(BackboneWeightsError, match=r"patch_embed\.proj\.weight has shape \(32, 3, 4, 4\) in the file, "
                                                   r"backbone swin_tiny expects \(96, 3, 4, 4\)"):
        Backbone(BackboneConfig(name="swin_tiny", pretrained=True,
                                weights=str(swin_folder / "swin_tiny_patch4_window7_224.pth")))


def test_msra_caffe2_and_non_torchvision_detectron2_files_are_refused(resnet, tmp_path):
    # Detectron1/Caffe2 blob names, as in detectron2's ImageNetPretrained/MSRA/R-50.pkl.
    caffe2 = {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "res_conv1_bn_s": np.ones(64, np.float32),
              "res_conv1_bn_b": np.zeros(64, np.float32), "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32)}
    with open(tmp_path / "R-50.pkl", "wb") as file:
        pickle.dump(caffe2, file)
    with pytest.raises(BackboneWeightsError, match="MSRA/Caffe2 ResNet weights .*stride in the 1x1"):
        Backbone(BackboneConfig(name="resnet50", pretrained=True, weights=str(tmp_path / "R-50.pkl")))
    # detectron2 names but not written by convert-torchvision-to-d2.py: cannot tell it from an MSRA conversion.
    _, folder = resnet
    with open(folder / "R-50.pkl", "rb") as file:
        document = pickle.load(file)
    document["__author__"] = "Caffe2"
    with open(tmp_path / "other.pkl", "wb") as file:
        pickle.dump(document, file)
    with pytest.raises(BackboneWeightsError, match="written by 'Caffe2'; only torchvision-converted"):
        Backbone(BackboneConfig(name="resnet50", pretrained=True, weights=str(tmp_path / "other.pkl")))
    # A file that would run code is refused before anything is built from it.
    with open(tmp_path / "evil.pkl", "wb") as file:
        file.write(b"cos\nsystem\n(S'echo hacked'\ntR.")
    with pytest.raises(BackboneWeightsError, match="refusing to unpickle"):
        Backbone(BackboneConfig(name="resnet50", pretrained=True, weights=str(tmp_path / "evil.pkl")))


# --------------------------------------------------------------------------------------- locating, presets, train
def test_weights_resolve_from_cwd_env_dir_and_other_suffix(tmp_path, monkeypatch, swin):
    _, folder = swin
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    assert resolve_weights("swin_tiny_patch4_window7_224.pth") is None
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    assert resolve_weights("swin_tiny_patch4_window7_224.pth") == folder / "swin_tiny_patch4_window7_224.pth"
    (folder / "only.pkl").write_bytes((folder / "swin_tiny_patch4_window7_224.pkl").read_bytes())
    assert resolve_weights("only.pth") == folder / "only.pkl"  # Mask2Former's converted .pkl stands in for the .pth
    (tmp_path / "only.pth").write_bytes(b"")
    assert resolve_weights("only.pth") == tmp_path / "only.pth"  # the working directory comes first
    with pytest.raises(BackboneWeightsError, match="URLs are not downloaded"):
        resolve_weights("detectron2://ImageNetPretrained/torchvision/R-50.pkl")


EXPECTED_PRESET_WEIGHTS = {
    "resnet50": "R-50.pkl",
    "swin_tiny": "swin_tiny_patch4_window7_224.pth",
    "swin_large": "swin_large_patch4_window12_384_22k.pth",
}


@pytest.mark.parametrize("preset", [
    "coco_panoptic_r50", "coco_panoptic_swin_tiny", "coco_panoptic_swin_large", "coco_instance_r50",
    "coco_instance_swin_tiny", "coco_instance_swin_large", "ade20k_semantic_r50", "ade20k_semantic_swin_tiny",
    "ade20k_semantic_swin_large", "cityscapes_panoptic_r50", "cityscapes_panoptic_swin_tiny",
    "cityscapes_panoptic_swin_large", "cityscapes_semantic_r50", "cityscapes_semantic_swin_tiny",
    "cityscapes_semantic_swin_large", "maskformer_ade20k_semantic_r50",
])
def test_reference_presets_name_their_imagenet_file(preset):
    backbone = load_config(preset).model.backbone
    assert backbone.pretrained and backbone.weights == EXPECTED_PRESET_WEIGHTS[backbone.name]
    if backbone.name == "swin_large":  # the 384 IN-22k checkpoint's relative position tables are 23x23
        from mask2former.config import SWIN_SPECS

        assert {**SWIN_SPECS["swin_large"].__dict__, **backbone.kwargs}["window_size"] == 12


def test_training_a_reference_preset_without_its_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    config = load_config("coco_panoptic_r50", [f"data.root={tmp_path}"])
    with pytest.raises(BackboneWeightsError) as error:
        run_train(config)
    message = str(error.value)
    assert "'R-50.pkl' not found" in message and "ImageNetPretrained/torchvision/R-50.pkl" in message
    assert "convert-torchvision-to-d2.py" in message and "model.backbone.pretrained=false" in message
    assert main(["train", "--config", "coco_panoptic_swin_large", f"data.root={tmp_path}"]) == 1
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and "swin_large_patch4_window12_384_22k.pth" in stderr
    assert "github.com/SwinTransformer/storage/releases" in stderr
    # pretrained=false passes the check: run_train goes on to the data (which is absent here).
    check_backbone_weights(load_config("coco_panoptic_r50", ["model.backbone.pretrained=false"]))
    with pytest.raises(Exception) as later:
        run_train(load_config("coco_panoptic_r50", ["model.backbone.pretrained=false", f"data.root={tmp_path}"]))
    assert not isinstance(later.value, BackboneWeightsError)


TINY_TRAIN = [
    "model.backbone.name=resnet50", "model.backbone.freeze_at=5", "model.hidden_dim=32", "model.conv_dim=32",
    "model.mask_dim=32", "model.num_queries=8", "model.dim_feedforward=64", "model.dec_layers=2", "model.enc_layers=1",
    "model.enc_ffn_dim=64", "model.num_heads=2", "loss.num_points=64", "data.num_train_images=2",
    "data.num_val_images=0", "data.val_split=", "data.image_size=64", "data.crop_size=[64,64]", "data.num_workers=0",
    "solver.max_iter=1", "solver.batch_size=2", "solver.precision=fp32", "mask_piloting.enabled=false",
]


def test_training_loads_the_file_and_pretrained_false_trains_without(resnet, tmp_path, monkeypatch, capsys):
    model, folder = resnet
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    overrides = TINY_TRAIN + ["model.backbone.pretrained=true", "model.backbone.weights=R-50.pkl"]
    result = run_train(load_config("fashion_scenes_lite0", overrides + [f"train.output_dir={tmp_path / 'a'}"]))
    assert result["step"] == 1
    assert "backbone resnet50: loaded 318 tensors from " in capsys.readouterr().out
    # The trained (fully frozen) backbone still holds the file's weights.
    trained = Mask2Former.from_pretrained(result["final_model"])
    torch.testing.assert_close(trained.backbone.body.state_dict()["layer4.2.conv3.weight"],
                               model.state_dict()["layer4.2.conv3.weight"])
    monkeypatch.delenv(WEIGHTS_DIR_ENV)
    overrides = TINY_TRAIN + ["model.backbone.pretrained=false", "model.backbone.weights=R-50.pkl"]
    result = run_train(load_config("fashion_scenes_lite0", overrides + [f"train.output_dir={tmp_path / 'b'}"]))
    assert result["step"] == 1 and "random initialisation (pretrained=false)" in capsys.readouterr().out


def test_inference_and_from_pretrained_do_not_need_the_file(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    config = load_config("coco_panoptic_swin_tiny", ["model.enc_layers=1", "model.dec_layers=1"]).model
    config.backbone.kwargs = {**TINY_SWIN, "num_heads": [1, 2, 2, 4]}
    with caplog.at_level("WARNING", logger="mask2former.backbone"):
        model = Mask2Former(config)
    assert "swin_tiny_patch4_window7_224.pth' not found" in caplog.text and "stays random" in caplog.text
    model.save_pretrained(tmp_path / "saved")
    saved = yaml.safe_load((tmp_path / "saved" / "config.yaml").read_text())
    assert saved["model"]["backbone"]["weights"] == "swin_tiny_patch4_window7_224.pth"
    # A file that is there but broken is not even read: the checkpoint replaces the backbone.
    (tmp_path / "swin_tiny_patch4_window7_224.pth").write_bytes(b"not a checkpoint")
    caplog.clear()
    loaded = Mask2Former.from_pretrained(tmp_path / "saved")
    assert "skipped" in loaded.backbone.weights_report and "not found" not in caplog.text
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with skip_imagenet_weights():
        Backbone(BackboneConfig(name="resnet50", pretrained=True))  # not even the missing-weights error
