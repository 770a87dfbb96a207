import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mask2former.training import distributed as dist_utils
from mask2former.training.checkpoint import atomic_write_text, checkpoint_path
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
