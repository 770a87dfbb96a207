import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from mask2former.interop.errors import CheckpointError
from mask2former.interop.safe_pickle import UnsafeCheckpointError, load_pickle, load_untrusted


class RunsACommand:
    """Unpickling this with ``pickle.load`` would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsNumpyLoad:
    def __reduce__(self):
        return (np.load, ("/nonexistent.npy",))


def _weights():
    state = OrderedDict(
        conv=np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        transposed=np.arange(6, dtype=np.float64).reshape(2, 3).T,  # non-contiguous
        index=np.arange(5, dtype=np.int64),
        empty=np.zeros((0, 3), dtype=np.float16),
    )
    # torch's state_dict() carries per-module versions here; detectron2 pickles keep it.
    state._metadata = OrderedDict({"": {"version": 2}})
    return {"model": state, "__author__": "test", "matching_heuristics": True, "scalar": np.float32(1.5), "tags": {"a"}}


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_checkpoint_loads_at_every_protocol(tmp_path, protocol):
    path = tmp_path / "model_final.pkl"
    expected = _weights()
    path.write_bytes(pickle.dumps(expected, protocol=protocol))
    loaded = load_untrusted(path)
    assert loaded.keys() == expected.keys()
    assert isinstance(loaded["model"], OrderedDict) and list(loaded["model"]) == list(expected["model"])
    assert loaded["model"]._metadata == {"": {"version": 2}}
    for key, array in expected["model"].items():
        assert loaded["model"][key].dtype == array.dtype
        np.testing.assert_array_equal(loaded["model"][key], array)
    assert loaded["scalar"] == np.float32(1.5) and loaded["tags"] == {"a"}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2), "x": RunsACommand(marker)}}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError) as error:
        load_untrusted(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: refusing to unpickle {os.system.__module__}.system")
    assert "only numpy arrays and plain containers are allowed" in message
    assert not marker.exists()
    # The oracle: the unrestricted loader does run it.
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_non_allowed_name_in_an_allowed_module_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps([CallsNumpyLoad()]))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle numpy\.load"):
        load_pickle(path)


def test_persistent_ids_are_refused(tmp_path):
    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage" if isinstance(obj, bytes) else None

    path = tmp_path / "checkpoint.pkl"
    with open(path, "wb") as file:
        WithPersistentIds(file).dump({"w": b"data"})
    with pytest.raises(UnsafeCheckpointError, match="persistent id"):
        load_pickle(path)


def test_not_a_pickle(tmp_path):
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(CheckpointError, match="not a readable pickle"):
        load_untrusted(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_untrusted(tmp_path / "missing.pkl")


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_files_go_through_weights_only(tmp_path, zip_format):
    path = tmp_path / "model_0009999.pth"
    state = {"model": {"w": torch.arange(4.0)}, "iteration": 9999}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_untrusted(path)
    assert loaded["iteration"] == 9999 and torch.equal(loaded["model"]["w"], state["model"]["w"])

    marker = tmp_path / "pwned"
    evil = {"model": {"w": torch.zeros(1)}, "x": RunsACommand(marker)}
    torch.save(evil, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match=r"weights_only=True\) refused the file \(.*system") as error:
        load_untrusted(path)
    assert "\n" not in str(error.value)
    assert not marker.exists()
