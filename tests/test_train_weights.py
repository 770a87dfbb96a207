"""`mask2former train` with model.weights (fine-tuning), --resume over it, and train.freeze."""

import pytest
import torch
from test_train import TINY, one_thread  # noqa: F401 - the autouse fixture

from mask2former.apps.train import run_train
from mask2former.config import load_config
from mask2former.data.fashion_scenes import fashion_scenes_label_space
from mask2former.modeling.build import build_model
from mask2former.modeling.model import Mask2Former
from mask2former.training.trainer import Trainer

FAST = TINY + ["data.num_val_images=0", "train.checkpoint_period=1", "solver.max_iter=2"]




def checkpoint_with_renamed_class(path, seed, num_queries=6):
    """A tiny FashionScenes model (6 queries; the run's config says 8) whose label space calls Trouser "Pants"."""
    torch.manual_seed(seed)
    labels = fashion_scenes_label_space().to_dict()
    labels["names"] = ["Pants" if name == "Trouser" else name for name in labels["names"]]
    config = load_config("fashion_scenes_lite0", TINY + [f"model.num_queries={num_queries}"])
    model = Mask2Former(build_model(config).config, labels=labels)
    model.save_pretrained(path)
    return model


def test_train_from_weights_takes_the_checkpoint_architecture_and_logs_the_classes(tmp_path, capsys):
    checkpoint_with_renamed_class(tmp_path / "a", seed=1)
    config = load_config("fashion_scenes_lite0", FAST + [f"model.weights={tmp_path / 'a'}",
                                                         f"train.output_dir={tmp_path / 'run'}"])
    result = run_train(config, resume=False)
    out = capsys.readouterr().out
    assert "12 of 13 classes matched by name" in out and "1 new classes start from a fresh initialisation: Trouser" in out
    assert "checkpoint classes not in the data set, not used: Pants" in out
    assert "config values not used: model.num_queries=8 (checkpoint: 6)" in out
    final = Mask2Former.from_pretrained(result["final_model"])
    assert final.config.num_queries == 6 and final.labels["names"][1] == "Trouser"
    assert final.config.weights == str(tmp_path / "a")
    # An explicit model.* override wins over the checkpoint (and must fit its tensors: a query count does not).
    with pytest.raises(ValueError, match=r"query_(feat|embed).weight has shape \(6, 32\) .* expects \(8, 32\)"):
        run_train(config, explicit_model_keys=["model.num_queries"])


def test_resume_wins_over_weights(tmp_path, capsys):
    checkpoint_with_renamed_class(tmp_path / "a", seed=1)
    checkpoint_with_renamed_class(tmp_path / "b", seed=2)
    run = tmp_path / "run"
    first = run_train(load_config("fashion_scenes_lite0", FAST + [f"model.weights={tmp_path / 'a'}",
                                                                  f"train.output_dir={run}"]))
    trained = {k: v.clone() for k, v in Mask2Former.from_pretrained(first["final_model"]).state_dict().items()}
    capsys.readouterr()
    again = run_train(load_config("fashion_scenes_lite0", FAST + [f"model.weights={tmp_path / 'b'}",
                                                                  f"train.output_dir={run}"]), resume=True)
    assert "--resume wins over model.weights" in capsys.readouterr().out
    resumed = Mask2Former.from_pretrained(again["final_model"]).state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in trained.items())


def test_freeze_keeps_the_backbone_and_its_batch_norm(tmp_path):
    config = load_config("fashion_scenes_lite0", FAST + ["model.backbone.norm=BN", "model.backbone.freeze_at=0",
                                                         "train.freeze=[backbone]", f"train.output_dir={tmp_path}",
                                                         "mask_piloting.enabled=false"])
    torch.manual_seed(0)
    model = build_model(config, fashion_scenes_label_space())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(config, model, tensorboard=False, progress_bar=False)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in model.backbone.parameters())
    assert all(id(p) in optimised for p in model.pixel_decoder.parameters())
    trainer.fit()
    after = model.state_dict()
    backbone = [k for k in before if k.startswith("backbone.")]
    assert any(k.endswith("running_mean") for k in backbone)
    assert all(torch.equal(after[k], before[k]) for k in backbone)  # weights and batch-norm statistics
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("pixel_decoder."))
    model.train()
    model(torch.zeros(1, 3, 64, 64))
    assert not model.backbone.training and model.pixel_decoder.training
