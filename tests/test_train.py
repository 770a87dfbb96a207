import json

import pytest
import torch

from mask2former.apps.train import run_train
from mask2former.config import load_config
from mask2former.data import FashionScenes
from mask2former.data.build import build_datasets, build_train_transforms
from mask2former.modeling.model import Mask2Former
from mask2former.training.build import build_criterion

TINY = [
    "model.backbone.pretrained=false", "model.hidden_dim=32", "model.conv_dim=32", "model.mask_dim=32",
    "model.num_queries=8", "model.dim_feedforward=64", "model.dec_layers=2", "model.enc_layers=1",
    "model.enc_ffn_dim=64", "model.num_heads=2", "loss.num_points=64", "data.num_train_images=4",
    "data.num_val_images=2", "data.image_size=64", "data.crop_size=[64,64]", "data.num_workers=0",
    "solver.max_iter=2", "solver.batch_size=2",
]


def train_tiny(output_dir) -> None:
    """`mask2former train` on the TINY preset into ``output_dir``, with one torch thread."""
    from mask2former.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TINY, f"train.output_dir={output_dir}"]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_train_fashion_scenes_end_to_end(tmp_path):
    """The default preset, shrunk: FashionScenes, the lite0 backbone (random init), bf16 autocast, evaluation at the
    end with PQ/AP/mIoU, and a final model that loads with from_pretrained."""
    config = load_config("fashion_scenes_lite0", TINY + [f"train.output_dir={tmp_path}", "train.checkpoint_period=1"])
    assert config.model.num_classes == 13 and config.solver.precision == "auto"
    result = run_train(config, resume=False)
    assert result["step"] == 2 and result["best"]["metric"] == "PQ"
    assert {"PQ", "AP", "mIoU"} <= set(result["metrics"])
    model = Mask2Former.from_pretrained(tmp_path / "model_final")
    assert model.num_classes == 13 and model.labels["names"] == FashionScenes.label_space.names
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(row["loss"], float) and row["loss"] > 0 for row in rows if "loss" in row)
    # Resuming a finished run trains nothing more and keeps the final step.
    again = run_train(config, resume=True)
    assert again["step"] == 2


def test_builders_follow_the_config():
    config = load_config("fashion_scenes_lite0", TINY + ["data.augmentation=lsj", "model.num_classes=3"])
    train, val, labels = build_datasets(config)
    assert isinstance(train, FashionScenes) and len(train) == 4 and len(val) == 2 and labels.num_classes == 13
    assert train.transforms is not None and val.transforms is None
    criterion = build_criterion(config, labels.num_classes)
    assert criterion.num_classes == 13 and criterion.matcher.num_points == 64
    semantic = load_config("ade20k_semantic_r50", ["data.crop_size=[512,1024]"])
    names = [type(t).__name__ for t in build_train_transforms(semantic.data).transforms]
    assert names == ["ResizeShortestEdge", "RandomCrop", "ColorAugSSD", "RandomHorizontalFlip", "PadToSize"]
    with pytest.raises(ValueError, match="square"):
        build_train_transforms(load_config("coco_panoptic_r50", ["data.crop_size=[512,1024]"]).data)
    with pytest.raises(ValueError, match="data.root is empty"):
        build_datasets(load_config("ade20k_semantic_r50", ["data.root="]))


def test_crop_augmentation_keeps_the_scale():
    """``crop``: a random crop_size window of the scene at its original scale; items cut away entirely are dropped."""
    config = load_config("fashion_scenes_lite0", TINY + ["data.augmentation=crop", "data.crop_size=[40,48]"])
    transform = build_train_transforms(config.data)
    scenes = FashionScenes("train", num_images=4, image_size=64, source="subset")
    torch.manual_seed(0)
    for index in range(4):
        sample = scenes[index]
        cropped = transform(sample)
        assert cropped["image"].shape == (3, 40, 48) and cropped["masks"].shape[1:] == (40, 48)
        # Find the window: it is a plain slice of the full image.
        matches = [(top, left) for top in range(64 - 40 + 1) for left in range(64 - 48 + 1)
                   if torch.equal(sample["image"][:, top:top + 40, left:left + 48], cropped["image"])]
        assert matches
        top, left = matches[0]
        window = sample["masks"][:, top:top + 40, left:left + 48]
        kept = window.flatten(1).any(1)
        assert torch.equal(cropped["masks"], window[kept]) and torch.equal(cropped["labels"], sample["labels"][kept])
        assert torch.equal(cropped["semantic"], sample["semantic"][top:top + 40, left:left + 48])


def test_overlays_use_every_test_setting(monkeypatch, tmp_path):
    """``config.test`` reaches the overlay predictor whole: thresholds, top_k and sizes, not only the task."""
    from mask2former.inference import predictor as predictor_module
    from mask2former.training.report import write_overlays

    config = load_config("fashion_scenes_lite0", ["test.object_mask_threshold=0.25", "test.overlap_threshold=0.6",
                                                  "test.top_k=7", "test.min_size=0", "test.max_size=640"])
    seen = {}

    class RecordingPredictor:
        def __init__(self, model, **options):
            seen.update(options)

    monkeypatch.setattr(predictor_module, "Predictor", RecordingPredictor)
    assert write_overlays(torch.nn.Linear(1, 1), [], None, tmp_path, config.test) == []
    assert seen["task"] == "panoptic" and seen["precision"] == "fp32"
    assert {key: seen[key] for key in ("object_mask_threshold", "overlap_threshold", "top_k", "min_size",
                                       "max_size")} == {"object_mask_threshold": 0.25, "overlap_threshold": 0.6,
                                                        "top_k": 7, "min_size": None, "max_size": 640}
    assert seen["semantic_postprocess_before_inference"] is True  # the reference's rule for a panoptic task
