import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_swin_config
from torch import nn

from mask2former.config import Config, DataConfig, LossConfig, SolverConfig, TrainConfig
from mask2former.data import FashionScenes
from mask2former.data.transforms import lsj_train_transforms
from mask2former.training.resume import checkpoint_path, load_training_checkpoint
from mask2former.training.trainer import Callback, NonFiniteLossError, Trainer, remove_crowd

TESTS_DIR = Path(__file__).resolve().parent
NUM_CLASSES = 13


def tiny_config(output_dir, *, max_iter=4, batch_size=2, num_workers=0, seed=3, loss=None, train=None, **solver):
    solver_values = {"base_lr": 1e-3, "max_iter": max_iter, "batch_size": batch_size, "warmup_iters": 2,
                     "warmup_factor": 0.1, **solver}
    train_values = {"output_dir": str(output_dir), "checkpoint_period": 2, "log_period": 1, "seed": seed,
                    **(train or {})}
    return Config(
        model=tiny_swin_config(num_classes=NUM_CLASSES, dec_layers=2, enc_layers=1),
        loss=LossConfig(**{"num_points": 64, **(loss or {})}),
        data=DataConfig(num_workers=num_workers),
        solver=SolverConfig(**solver_values),
        train=TrainConfig(**train_values),
    )


def fashion(num_images=6, augment=False):
    return FashionScenes("train", num_images=num_images, image_size=64, max_items=3,
                         transforms=lsj_train_transforms(64, 0.5, 1.5) if augment else None)


class BoxScenes(torch.utils.data.Dataset):
    """Deterministic random images with ``segments`` rectangles each (so every image has the same number of
    ground-truth masks); ``sizes`` cycles image sizes; ``crowd`` marks segment indices as crowd."""

    def __init__(self, num_images=8, sizes=((64, 64),), segments=3, crowd=()):
        self.num_images, self.sizes, self.segments, self.crowd = num_images, sizes, segments, crowd

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        height, width = self.sizes[index % len(self.sizes)]
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        masks = torch.zeros(self.segments, height, width, dtype=torch.bool)
        for k in range(self.segments):
            top = int(torch.randint(0, height // 2, (1,), generator=generator))
            left = int(torch.randint(0, width // 2, (1,), generator=generator))
            masks[k, top:top + height // 3, left:left + width // 3] = True
        labels = torch.randint(0, NUM_CLASSES, (self.segments,), generator=generator)
        semantic = torch.full((height, width), 255, dtype=torch.int64)
        for label, mask in zip(labels, masks):
            semantic[mask] = label
        iscrowd = torch.tensor([k in self.crowd for k in range(self.segments)])
        return {"image": image, "labels": labels, "masks": masks, "iscrowd": iscrowd, "semantic": semantic,
                "image_id": index, "file_name": "", "orig_size": (height, width)}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: identical float reductions here and in the subprocesses (1 thread there too), and
    no OpenMP spin-waiting when the 2 cores are shared (2 threads under load made these tests ~30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_rows(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    different = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ----------------------------------------------------------------------------------------------- overfit


def overfit_losses(output_dir, precision="fp32"):
    config = tiny_config(output_dir, max_iter=60, scheduler="step", steps=(1.0,), warmup_iters=0,
                         backbone_multiplier=1.0, precision=precision, loss={"num_points": 256},
                         train={"log_period": 5, "checkpoint_period": 0})
    trainer = Trainer(config, train_dataset=fashion(num_images=2), device="cpu", progress_bar=False, tensorboard=False)
    trainer.fit()
    return [row for row in read_rows(output_dir) if "loss" in row]


@pytest.fixture(scope="module")
def fp32_overfit_rows(tmp_path_factory):
    return overfit_losses(tmp_path_factory.mktemp("fp32"))


def test_overfits_two_images(fp32_overfit_rows):
    """Two fixed images, constant lr 1e-3 (backbone too), full-model clip 0.01 as in the recipe: the summed loss
    (3 prediction sets x (CE + BCE + dice)) must fall below 20% of its first value within 60 iterations. A broken
    update (wrong sign, no step, lost gradients, lr 0) leaves it near the start (~37); a working one reaches ~12%
    (measured: 20% is crossed around iteration 35-40, so the bound has margin without being loose)."""
    first, last = fp32_overfit_rows[0], fp32_overfit_rows[-1]
    assert first["step"] == 1 and last["step"] == 60
    assert last["loss"] < 0.2 * first["loss"], (first["loss"], last["loss"])


def test_bf16_loss_curve_tracks_fp32(tmp_path, fp32_overfit_rows):
    """The same overfit run under bf16 autocast: it also falls below 20% of its start, and at every logged step its
    loss is within 25% of the fp32 run's (measured: at most 15%, 36.8 -> 3.8 fp32 vs 4.4 bf16 at the end; bf16
    rounding makes the runs drift apart slowly, not diverge)."""
    bf16_rows = overfit_losses(tmp_path, "bf16")
    assert [row["step"] for row in bf16_rows] == [row["step"] for row in fp32_overfit_rows]
    assert bf16_rows[-1]["loss"] < 0.2 * bf16_rows[0]["loss"]
    for ours, reference in zip(bf16_rows, fp32_overfit_rows):
        assert abs(ours["loss"] - reference["loss"]) <= 0.25 * reference["loss"], (ours["step"], ours["loss"], reference["loss"])


# ----------------------------------------------------------------------------------------------- kill and resume

CHILD = """
import sys
sys.path.insert(0, {tests!r})
import test_trainer
test_trainer.child_train({output!r}, {workers}, {pause_after}, {marker!r})
"""


def run_resumable(output_dir, workers, callbacks=(), resume=False):
    config = tiny_config(output_dir, max_iter=5, num_workers=workers)
    trainer = Trainer(config, train_dataset=fashion(augment=True), device="cpu", progress_bar=False, tensorboard=False,
                      callbacks=callbacks)
    return trainer, trainer.fit(resume=resume)


def child_train(output_dir, workers, pause_after, marker):
    """Subprocess body: train, and after iteration ``pause_after`` (a checkpoint exists from iteration 2) signal
    the parent and hang until it SIGKILLs us."""
    torch.set_num_threads(1)

    class Pause(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == pause_after:
                Path(marker).write_text(str(step))
                time.sleep(600)

    run_resumable(output_dir, workers, callbacks=[Pause()])


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_and_resume_is_bit_exact(tmp_path, workers):
    """Random LSJ augmentation, point sampling and an epoch boundary (6 images, batch 2, 5 iterations): killed
    after iteration 3, resumed from the iteration-2 checkpoint, the final state equals an uninterrupted run."""
    reference, _ = run_resumable(tmp_path / "reference", workers)

    killed_dir, marker = tmp_path / "killed", tmp_path / "paused"
    log = open(tmp_path / "child.log", "w")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(tests=str(TESTS_DIR), output=str(killed_dir), workers=workers,
                                            pause_after=3, marker=str(marker))],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, f"child exited early:\n{(tmp_path / 'child.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "child did not reach iteration 3 in time"
            time.sleep(0.1)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the child's own session: it and its DataLoader workers
        child.wait()
        log.close()
    assert child.returncode == -signal.SIGKILL
    assert checkpoint_path(killed_dir, 2).exists() and not checkpoint_path(killed_dir, 4).exists()

    starts = []

    class RecordStart(Callback):
        def on_train_start(self, trainer):
            starts.append(trainer.step)

    resumed, result = run_resumable(killed_dir, workers, callbacks=[RecordStart()], resume=True)
    assert starts == [2] and result["step"] == 5
    assert_same_state(resumed.model, reference.model)
    for key in ("exp_avg", "exp_avg_sq"):
        for index, state in reference.optimizer.state_dict()["state"].items():
            assert torch.equal(state[key], resumed.optimizer.state_dict()["state"][index][key])
    # metrics.jsonl: the rows of the killed iteration 3 were replaced by the resumed run's.
    steps = [row["step"] for row in read_rows(killed_dir) if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 5


# ----------------------------------------------------------------------------------------------- non-finite losses


class NaNLogits:
    """Forward hook: NaN class logits on the listed calls (1-based), or on every call."""

    def __init__(self, calls=None):
        self.calls, self.count = calls, 0

    def __call__(self, module, inputs, output):
        self.count += 1
        if self.calls is None or self.count in self.calls:
            output.pred_logits = output.pred_logits * float("nan")
        return output


class Snapshots(Callback):
    def __init__(self):
        self.weights = {}

    def on_train_start(self, trainer):
        self.weights[0] = trainer.model.transformer_decoder.heads.class_embed.weight.detach().clone()

    def on_step_end(self, trainer, step, logs):
        self.weights[step] = trainer.model.transformer_decoder.heads.class_embed.weight.detach().clone()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_step_is_skipped_and_logged(tmp_path):
    snapshots = Snapshots()
    config = tiny_config(tmp_path, max_iter=3, train={"max_nonfinite_steps": 3})
    trainer = Trainer(config, train_dataset=BoxScenes(), device="cpu", progress_bar=False, tensorboard=False,
                      callbacks=[snapshots])
    trainer.model.register_forward_hook(NaNLogits(calls={2}))
    result = trainer.fit()
    assert torch.equal(snapshots.weights[2], snapshots.weights[1])  # no update at iteration 2
    assert not torch.equal(snapshots.weights[3], snapshots.weights[2])
    assert torch.isfinite(snapshots.weights[3]).all()
    assert result["nonfinite_steps"] == 1
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {2.0}
    skipped = [row for row in read_rows(tmp_path) if row.get("skipped")]
    assert [row["step"] for row in skipped] == [2] and "loss_ce" in skipped[0]["nonfinite_terms"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_losses_in_a_row_abort(tmp_path):
    snapshots = Snapshots()
    config = tiny_config(tmp_path, max_iter=10, train={"max_nonfinite_steps": 2})
    trainer = Trainer(config, train_dataset=BoxScenes(), device="cpu", progress_bar=False, tensorboard=False,
                      callbacks=[snapshots])
    trainer.model.register_forward_hook(NaNLogits())
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 iterations in a row"):
        trainer.fit()
    assert torch.equal(snapshots.weights[1], snapshots.weights[0])
    assert [row["step"] for row in read_rows(tmp_path) if row.get("skipped")] == [1, 2]


# ----------------------------------------------------------------------------------------------- batch handling


class RecordingCriterion(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.targets = inner, []

    def forward(self, outputs, targets, generator=None):
        self.targets.append(targets)
        return self.inner(outputs, targets, generator=generator)


def test_padding_is_zero_after_normalisation_and_crowd_is_dropped(tmp_path):
    from mask2former.training.build import build_criterion

    config = tiny_config(tmp_path, max_iter=1)
    criterion = RecordingCriterion(build_criterion(config, NUM_CLASSES))
    dataset = BoxScenes(num_images=2, sizes=((64, 64), (40, 50)), crowd=(1,))
    trainer = Trainer(config, train_dataset=dataset, criterion=criterion, device="cpu", progress_bar=False,
                      tensorboard=False)
    inputs = []
    trainer.model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    trainer.fit()
    images = inputs[0]
    assert images.shape == (2, 3, 64, 64)
    sample = dataset[1]  # the 40x50 image, padded to 64x64 by the collate
    mean = torch.tensor(config.model.pixel_mean).view(3, 1, 1)
    std = torch.tensor(config.model.pixel_std).view(3, 1, 1)
    expected = (sample["image"].float() - mean) / std
    small = next(b for b in range(2) if torch.allclose(images[b, :, :40, :50], expected))
    assert torch.all(images[small, :, 40:, :] == 0) and torch.all(images[small, :, :, 50:] == 0)
    for target in criterion.targets[0]:
        assert target["labels"].shape == (2,) and target["masks"].shape == (2, 64, 64)
    kept = remove_crowd({"labels": sample["labels"], "masks": sample["masks"], "iscrowd": sample["iscrowd"]},
                        torch.device("cpu"))
    assert kept["labels"].tolist() == sample["labels"][[0, 2]].tolist()


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """Deterministic loss setting (full-resolution mask loss: no random points) and the same number of segments
    in every image (so per-micro-batch normalisations average to the full-batch ones)."""
    results = []
    for name, accumulation in (("full", 1), ("accumulated", 2)):
        config = tiny_config(tmp_path / name, max_iter=2, batch_size=4, accumulation_steps=accumulation,
                             loss={"mask_loss": "full"}, train={"checkpoint_period": 0})
        trainer = Trainer(config, train_dataset=BoxScenes(), device="cpu", progress_bar=False, tensorboard=False)
        trainer.fit()
        results.append(trainer.model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-4, atol=1e-6, msg=key)


def test_batch_size_must_divide(tmp_path):
    with pytest.raises(ValueError, match="divisible by world size"):
        Trainer(tiny_config(tmp_path, batch_size=3, accumulation_steps=2), train_dataset=BoxScenes(),
                device="cpu", progress_bar=False, tensorboard=False)


# ----------------------------------------------------------------------------------------------- outputs


def test_logs_checkpoints_evaluation_and_best_model(tmp_path):
    metric_by_step = {2: 5.0, 4: 3.0}
    calls = []

    def evaluate(model, dataset):
        assert not model.training
        calls.append(len(dataset))
        return {"metrics": {"PQ": metric_by_step[len(calls) * 2], "SQ": 1.0}}

    config = tiny_config(tmp_path, max_iter=4, train={"eval_period": 2, "log_period": 2})
    trainer = Trainer(config, train_dataset=BoxScenes(), val_dataset=BoxScenes(num_images=3), evaluate_fn=evaluate,
                      device="cpu", progress_bar=False, image_log_period=2)
    result = trainer.fit()
    assert calls == [3, 3]
    assert result["best"] == {"metric": "PQ", "value": 5.0, "step": 2, "mode": "max"}
    best = yaml.safe_load((tmp_path / "model_best" / "config.yaml").read_text())
    assert best["best"]["step"] == 2
    assert (tmp_path / "model_final" / "model.safetensors").exists()

    rows = read_rows(tmp_path)
    train_rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2, 4]
    for key in ("loss", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "lr", "images_per_s", "time", "grad_norm"):
        assert key in train_rows[-1]
    assert [row["eval"]["PQ"] for row in rows if "eval" in row] == [5.0, 3.0]
    # lr logged is the one the iteration used: warm-up 2 iterations from 0.1, poly over 4.
    assert train_rows[0]["lr"] == pytest.approx(1e-3 * 0.1)
    assert train_rows[0]["lr_backbone"] == pytest.approx(1e-4 * 0.1)

    state = load_training_checkpoint(checkpoint_path(tmp_path, 4))
    assert {"model", "optimizer", "scheduler", "scaler", "step", "data", "rng", "best"} <= set(state)
    assert state["step"] == 4 and state["data"]["samples_consumed"] == 8 and state["data"]["epoch"] == 1
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda", "generator"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "train/sample_prediction" in events.Tags()["images"]
    assert {"train/loss", "train/lr", "eval/PQ"} <= set(events.Tags()["scalars"])


def test_bf16_autocast_trains_and_fp16_needs_cuda(tmp_path):
    config = tiny_config(tmp_path / "bf16", max_iter=2, precision="bf16", train={"checkpoint_period": 0})
    trainer = Trainer(config, train_dataset=BoxScenes(), device="cpu", progress_bar=False, tensorboard=False)
    before = trainer.model.transformer_decoder.heads.class_embed.weight.detach().clone()
    result = trainer.fit()
    assert result["nonfinite_steps"] == 0 and torch.isfinite(torch.tensor(result["losses"]["loss"]))
    after = trainer.model.transformer_decoder.heads.class_embed.weight
    assert after.dtype == torch.float32 and not torch.equal(before, after)  # fp32 master weights, updated
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(tiny_config(tmp_path / "fp16", precision="fp16"), train_dataset=BoxScenes(), device="cpu",
                progress_bar=False)


def test_mask_piloting_adds_its_losses(tmp_path):
    """MP-Former: the trainer builds the piloting queries from the (crowd-free) targets and the MP losses appear."""
    from mask2former.config import MaskPilotingConfig

    config = tiny_config(tmp_path, max_iter=2, train={"checkpoint_period": 0})
    config.mask_piloting = MaskPilotingConfig(enabled=True)
    trainer = Trainer(config, train_dataset=BoxScenes(crowd=(0,)), device="cpu", progress_bar=False, tensorboard=False)
    assert hasattr(trainer.model.transformer_decoder, "label_embed")
    result = trainer.fit()
    losses = result["losses"]
    assert {"loss_ce_mp", "loss_mask_mp", "loss_dice_mp", "loss_ce_mp_0"} <= set(losses)
    assert all(torch.isfinite(torch.tensor(value)) for key, value in losses.items() if key.startswith("loss"))


def test_auto_precision_is_bf16_only_where_native(tmp_path, monkeypatch):
    from mask2former.modeling import precision as precision_module

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision_module, "native_bf16", lambda device, native=native: native)
        config = tiny_config(tmp_path / expected, precision="auto")
        trainer = Trainer(config, train_dataset=BoxScenes(), device="cpu", progress_bar=False, tensorboard=False)
        assert trainer.config.solver.precision == expected  # resolved once, so checkpoints record what ran
        assert "auto" in trainer.precision_note
    # The real probe agrees with oneDNN's own bf16 check on this CPU.
    monkeypatch.undo()
    assert precision_module.native_bf16(torch.device("cpu")) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
