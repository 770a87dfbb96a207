import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mask2former.training import distributed as dist_utils
from mask2former.training.resume import atomic_write_text, checkpoint_path
from mask2former.training.trainer import Trainer

WORLD_SIZE = 2


def test_per_device_batch_size():
    assert dist_utils.per_device_batch_size(16, 8, 1) == 2
    assert dist_utils.per_device_batch_size(16, 1, 8) == 2
    assert dist_utils.per_device_batch_size(16, 2, 2) == 4
    with pytest.raises(ValueError, match=r"batch_size=6 .* divisible by world size \(2\) x .*accumulation_steps \(2\)"):
        dist_utils.per_device_batch_size(6, 2, 2)


def test_single_process_helpers(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = dist_utils.init_distributed("cpu")
    assert (context.rank, context.world_size, context.is_main, context.distributed) == (0, 1, True, False)
    assert dist_utils.all_reduce_mean({"a": torch.tensor(2.0), "b": 3}) == {"a": 2.0, "b": 3.0}
    model = nn.Linear(2, 2)
    assert dist_utils.wrap_ddp(model, context) is model and dist_utils.unwrap(model) is model
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        dist_utils.init_distributed("cpu")


def test_unused_parameters_are_named():
    model = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
    model["used"](torch.ones(1, 2)).sum().backward()
    assert dist_utils.unused_parameters(model) == ["unused.weight", "unused.bias"]


# ----------------------------------------------------------------------------------------------- 2-process DDP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _configs(root: Path):
    from test_trainer import tiny_config

    # Deterministic loss (no random points) for the comparison with one process; the default point loss for the
    # resume check.
    compare = tiny_config(root / "compare", max_iter=3, batch_size=4, loss={"mask_loss": "full"},
                          train={"checkpoint_period": 0})
    points = tiny_config(root / "points", max_iter=4, batch_size=4, train={"checkpoint_period": 2})
    resumed = tiny_config(root / "resumed", max_iter=4, batch_size=4, train={"checkpoint_period": 2})
    return compare, points, resumed


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from test_trainer import BoxScenes

    root = Path(root)
    compare, points, resumed = _configs(root)
    outputs = {}
    for name, config in (("compare", compare), ("points", points)):
        trainer = Trainer(config, train_dataset=BoxScenes(), device="cpu", progress_bar=False, tensorboard=False)
        trainer.fit()
        outputs[name] = trainer.model.state_dict()
        outputs[f"{name}_find_unused"] = trainer.ddp_model.find_unused_parameters
        outputs[f"{name}_loss"] = trainer.last_logs["loss"]
    # Resume the point-loss run from its iteration-2 checkpoint in a fresh directory (both ranks' RNG states).
    if rank == 0:
        target = checkpoint_path(resumed.train.output_dir, 2)
        target.parent.mkdir(parents=True)
        shutil.copy(checkpoint_path(points.train.output_dir, 2), target)
        atomic_write_text(target.parent / "last_checkpoint", target.name)
    dist_utils.barrier()
    trainer = Trainer(resumed, train_dataset=BoxScenes(), device="cpu", progress_bar=False, tensorboard=False)
    result = trainer.fit(resume=True)
    outputs["resumed"] = trainer.model.state_dict()
    outputs["resumed_from"] = result["step"]
    torch.save(outputs, root / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_gloo_matches_one_process_with_the_global_batch(tmp_path, monkeypatch):
    """2 processes x 2 images (gloo, CPU) vs 1 process x 4 images, same global batch and data order.

    Comparable because: the sampler gives the 2 ranks the two interleaved halves of the same global batch; the mask
    loss is the deterministic full-resolution one (the point loss draws random points per process, which a
    different split of the batch would change); every image has 3 segments, so the per-process class-loss means
    average to the global mean, and the criterion all-reduces num_masks. Left: float summation order. AdamW
    divides each gradient element by its own RMS, so elements whose true gradient is ~0 (attention key biases) turn
    rounding noise into visible steps: measured max difference 1.3e-7 after 3 steps of lr 1e-3; the tolerance is
    atol 1e-6 (0.1% of one step), rtol 1e-5."""
    from test_trainer import BoxScenes

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    compare, _, _ = _configs(tmp_path / "single")
    single = Trainer(compare, train_dataset=BoxScenes(), device="cpu", progress_bar=False, tensorboard=False)
    single.fit()
    reference = single.model.state_dict()
    moved = 0
    initial = Trainer(compare, train_dataset=BoxScenes(), device="cpu", progress_bar=False,
                      tensorboard=False).model.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(ranks[0]["compare"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        moved += int(not torch.equal(value, initial[key]))
    assert moved > 100  # the weights did train
    assert ranks[0]["compare_loss"] == pytest.approx(single.last_logs["loss"], rel=1e-5)

    for name in ("compare", "points", "resumed"):  # DDP keeps the replicas identical
        for key in ranks[0][name]:
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
    # Every parameter of Mask2Former gets a gradient: no find_unused_parameters overhead.
    assert ranks[0]["compare_find_unused"] is False
    # Resume in DDP restores each rank's RNG streams: bit-exact with the uninterrupted 2-process run.
    assert ranks[0]["resumed_from"] == 4
    for key in ranks[0]["points"]:
        assert torch.equal(ranks[0]["resumed"][key], ranks[0]["points"][key]), key


# ----------------------------------------------------------------------------------------------- SyncBN (gloo)

SYNC_BATCH, SYNC_CHANNELS = 4, 3


def _sync_data():
    """The global batch (channel means 5, -3, 0.5, different spreads), per-element loss weights, and a conv."""
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(SYNC_BATCH, SYNC_CHANNELS, 5, 6, generator=generator)
    images = images * torch.tensor([1.0, 4.0, 0.2]).view(1, -1, 1, 1) + torch.tensor([5.0, -3.0, 0.5]).view(1, -1, 1, 1)
    # Per-rank shift: the ranks' batches have clearly different statistics.
    images[SYNC_BATCH // 2:] += 2.0
    loss_weights = torch.randn(SYNC_BATCH, SYNC_CHANNELS, 5, 6, generator=generator)
    return images, loss_weights


def _sync_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Identity(), nn.BatchNorm2d(SYNC_CHANNELS))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        model[1].bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    return model


def _sync_worker(rank: int, port: int, root: str) -> None:
    from timm.layers.norm_act import BatchNormAct2d

    from mask2former.training.sync_batch_norm import SyncBatchNorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context = dist_utils.init_distributed("cpu")
    images, loss_weights = _sync_data()
    half = SYNC_BATCH // WORLD_SIZE
    local = images[rank * half:(rank + 1) * half].clone().requires_grad_(True)
    local_weights = loss_weights[rank * half:(rank + 1) * half]
    out = {}
    for name, sync in (("sync", True), ("plain", False)):
        model = _sync_model().train()
        ddp = dist_utils.wrap_ddp(model, context, sync_batch_norm=sync)
        out[f"{name}_type"] = type(model[1]).__name__
        x = local.detach().clone().requires_grad_(True)
        y = ddp(x)
        (y * local_weights).sum().backward()
        out[f"{name}_y"], out[f"{name}_x_grad"] = y.detach(), x.grad
        out[f"{name}_weight_grad"] = model[1].weight.grad  # DDP-averaged over the ranks
        out[f"{name}_running_mean"] = model[1].running_mean.clone()
        out[f"{name}_running_var"] = model[1].running_var.clone()
    # timm's BatchNormAct2d keeps its activation after conversion.
    norm_act = BatchNormAct2d(SYNC_CHANNELS, act_layer=nn.ReLU).train()
    converted = dist_utils.wrap_ddp(nn.Sequential(norm_act), context, sync_batch_norm=True).module[0]
    assert isinstance(converted, SyncBatchNorm)
    out["act_y"] = converted(local.detach()).detach()
    # The trainer converts a SyncBN backbone when it wraps the model in DDP.
    import dataclasses

    from test_trainer import NUM_CLASSES, BoxScenes, tiny_config

    from mask2former.config import BackboneConfig, ModelConfig

    config = tiny_config(Path(root) / "syncbn", max_iter=1, batch_size=4, train={"checkpoint_period": 0})
    config = dataclasses.replace(config, model=ModelConfig(
        num_classes=NUM_CLASSES, backbone=BackboneConfig(name="resnet18", norm="SyncBN"), hidden_dim=32, conv_dim=32,
        mask_dim=32, num_heads=2, num_queries=4, dim_feedforward=32, enc_layers=1, enc_ffn_dim=32, dec_layers=1))
    trainer = Trainer(config, train_dataset=BoxScenes(), device="cpu", progress_bar=False, tensorboard=False)
    trainer.fit()
    out["trainer_norms"] = sorted({type(m).__name__ for m in trainer.model.modules()
                                   if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    out["trainer_running_means"] = [m.running_mean.clone() for m in trainer.model.modules()
                                    if isinstance(m, SyncBatchNorm)]
    torch.save(out, Path(root) / f"sync{rank}.pt")
    dist_utils.cleanup(context)


def test_sync_batch_norm_two_process_gloo_uses_the_global_batch(tmp_path, monkeypatch):
    """2 ranks x 2 images with different statistics. Oracle: one process, plain BatchNorm2d over all 4 images
    (the reference's SyncBN semantics): its running stats (momentum 0.1 from 0 / 1: 0.1 * mean, 0.9 + 0.1 *
    unbiased var over all 4 images), its outputs and input gradients (the rank's slice of the global-batch ones) and
    its weight gradient (DDP averages the ranks' local sums, so half the global one). Plain BN under DDP instead
    normalises each rank by its own 2 images."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mp.spawn(_sync_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"sync{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    images, loss_weights = _sync_data()
    mean = images.mean((0, 2, 3))
    unbiased = images.var((0, 2, 3), unbiased=True)
    oracle = _sync_model().train()
    x = images.clone().requires_grad_(True)
    y = oracle(x)
    (y * loss_weights).sum().backward()
    half = SYNC_BATCH // WORLD_SIZE
    for rank, out in enumerate(ranks):
        assert out["sync_type"] == "SyncBatchNorm" and out["plain_type"] == "BatchNorm2d"
        torch.testing.assert_close(out["sync_running_mean"], 0.1 * mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["sync_running_var"], 0.9 + 0.1 * unbiased, rtol=1e-6, atol=1e-6)
        part = slice(rank * half, (rank + 1) * half)
        torch.testing.assert_close(out["sync_y"], y[part].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["sync_x_grad"], x.grad[part], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["sync_weight_grad"], oracle[1].weight.grad / WORLD_SIZE, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["act_y"], torch.relu((images[part] - mean.view(1, -1, 1, 1))
                                                            / torch.sqrt(images.var((0, 2, 3), unbiased=False)
                                                                         + 1e-5).view(1, -1, 1, 1)),
                                   rtol=1e-5, atol=1e-5)
        # Plain BN: each rank's own statistics (DDP broadcasts rank 0's buffers only before the next forward).
        own_mean = images[part].mean((0, 2, 3))
        torch.testing.assert_close(out["plain_running_mean"], 0.1 * own_mean, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out["plain_running_mean"], out["sync_running_mean"], atol=0.05)
        assert not torch.allclose(out["plain_y"], out["sync_y"], atol=0.05)
        assert out["trainer_norms"] == ["SyncBatchNorm"] and len(out["trainer_running_means"]) == 20
    # Both ranks' trained backbones normalised with the same (global) statistics.
    for first, second in zip(ranks[0]["trainer_running_means"], ranks[1]["trainer_running_means"]):
        torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)


def test_sync_batch_norm_in_one_process_is_batch_norm():
    """Without a process group the converted module is BatchNorm2d: same outputs, state-dict names and tensors."""
    from mask2former.training.sync_batch_norm import SyncBatchNorm, convert_sync_batch_norm

    images, _ = _sync_data()
    reference, model = _sync_model(), _sync_model()
    parameters = [id(p) for p in model.parameters()]
    convert_sync_batch_norm(model)
    assert isinstance(model[1], SyncBatchNorm) and [id(p) for p in model.parameters()] == parameters
    assert list(model.state_dict()) == list(reference.state_dict())
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(reference, mode)()
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(TypeError, match="cannot convert 0 \\(LazyBatchNorm2d\\)"):
        convert_sync_batch_norm(nn.Sequential(nn.LazyBatchNorm2d()))
