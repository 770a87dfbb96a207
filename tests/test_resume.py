import random

import numpy as np
import pytest
import torch

from mask2former.training.resume import (
    atomic_torch_save,
    atomic_write_bytes,
    capture_rng_state,
    checkpoint_path,
    find_last_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_training_checkpoint,
)


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "state.pt"
    atomic_torch_save({"x": torch.arange(3)}, target)

    def crash(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, crash)
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_last_checkpoint_pointer_and_pruning(tmp_path):
    for step in (2, 4, 6):
        save_training_checkpoint({"step": step}, tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert find_last_checkpoint(tmp_path) == checkpoint_path(tmp_path, 6)
    assert load_training_checkpoint(find_last_checkpoint(tmp_path))["step"] == 6
    # Without the pointer file the highest step wins.
    (tmp_path / "checkpoints" / "last_checkpoint").unlink()
    assert find_last_checkpoint(tmp_path) == checkpoint_path(tmp_path, 6)
    assert find_last_checkpoint(tmp_path / "nothing") is None


def test_stale_temporaries_removed_and_torn_file_reported(tmp_path):
    save_training_checkpoint({"step": 1}, tmp_path, 1)
    stale = tmp_path / "checkpoints" / ".checkpoint_0000002.pt.tmp-123-abcd"
    stale.write_bytes(b"torn")
    assert find_last_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
    remove_stale_temporaries(tmp_path)
    assert not stale.exists()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_training_checkpoint(bad)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    generator = torch.Generator().manual_seed(7)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    atomic_torch_save({"rng": capture_rng_state(generator)}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3), torch.rand(2, generator=generator))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    generator.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], generator)
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3), torch.rand(2, generator=generator))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3]) and torch.equal(got[4], expected[4])
