import io
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
    assert "only numpy arrays, torch tensors and plain containers are allowed" in message
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


# ----- torch tensors in a plain pickle (Mask2Former's converted Swin .pkl, DetectionCheckpointer .pkl files) -------


def _tensors():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return OrderedDict(
        weight=base, view=base[1:, 2:5], transposed=base.T, scalar=torch.tensor(7), half=torch.ones(3).half(),
        bfloat=torch.linspace(0, 1, 5).bfloat16(), index=torch.arange(5), flags=torch.tensor([True, False]),
        empty=torch.zeros(0, 3), parameter=torch.nn.Parameter(torch.full((2,), 0.5)),
    )


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_torch_tensors_in_a_plain_pickle_load_at_every_protocol(tmp_path, protocol):
    path = tmp_path / "swin_tiny_patch4_window7_224.pkl"
    state = _tensors()
    # What tools/convert-pretrained-swin-model-to-d2.py writes: plain pickle.dump of torch tensors.
    path.write_bytes(pickle.dumps({"model": state, "__author__": "third_party", "matching_heuristics": True},
                                  protocol=protocol))
    loaded = load_untrusted(path)
    assert loaded["__author__"] == "third_party" and loaded["matching_heuristics"] is True
    assert list(loaded["model"]) == list(state)
    for key, tensor in state.items():
        got = loaded["model"][key]
        assert type(got) is torch.Tensor and not got.requires_grad, key
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and got.stride() == tensor.stride(), key
        assert torch.equal(got, tensor.detach()), key


class _Storage:
    """Pickles as a tensor storage does (``torch.storage._load_from_bytes(payload)``), with any payload."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.payload,))


class _Tensor:
    """Pickles as a tensor does (``torch._utils._rebuild_tensor_v2``) over a given storage and geometry."""

    def __init__(self, storage, size=(1,), stride=(1,), offset=0):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (*self.args, False, OrderedDict()))


def _legacy_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@pytest.mark.parametrize("protocol", [2, 4])
def test_storage_bytes_that_would_run_code_are_refused_unexecuted(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "swin_tiny_patch4_window7_224.pkl"
    evil = _Tensor(_Storage(_legacy_save(RunsACommand(marker))))
    path.write_bytes(pickle.dumps({"model": {"w": torch.zeros(2), "x": evil}, "__author__": "third_party"},
                                  protocol=protocol))
    with pytest.raises(UnsafeCheckpointError) as error:
        load_untrusted(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: the bytes of a tensor storage were refused by torch.load(weights_only=True)")
    assert "system" in message  # torch's reason names the global it refused
    assert not marker.exists()
    # The oracle: pickle.load (torch's own _load_from_bytes, weights_only=False) does run it.
    with pytest.raises(Exception):
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_storage_bytes_must_hold_a_storage_and_tensors_must_fit_it(tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": _Tensor(_Storage(_legacy_save({"a": torch.zeros(1)})))}}))
    with pytest.raises(UnsafeCheckpointError, match=r"model_final\.pkl: the bytes of a tensor storage hold a dict"):
        load_untrusted(path)
    # A tensor reaching past its storage (torch's rebuild would silently grow the storage).
    storage = _Storage(_legacy_save(torch.zeros(2).untyped_storage()))
    path.write_bytes(pickle.dumps({"model": {"w": _Tensor(_Storage(_legacy_save(torch.zeros(2).storage())),
                                                          size=(3, 2), stride=(2, 1))}}))
    with pytest.raises(CheckpointError, match=r"model_final\.pkl: a tensor of size \(3, 2\) .* storage of 2$"):
        load_untrusted(path)
    # Bytes of an untyped storage (no dtype), or a tensor over anything but a storage, are refused.
    path.write_bytes(pickle.dumps({"model": {"w": _Tensor(storage)}}))
    with pytest.raises(UnsafeCheckpointError, match="refused by torch.load"):
        load_untrusted(path)
    path.write_bytes(pickle.dumps({"model": {"w": _Tensor(np.zeros(3))}}))
    with pytest.raises(UnsafeCheckpointError, match="a tensor is rebuilt from a ndarray, not from a storage"):
        load_untrusted(path)


class _OtherTorchRebuild:
    def __reduce__(self):
        return (torch._utils._rebuild_parameter_with_state, (None, None, None, None))


def test_other_torch_globals_are_refused_by_name(tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": _OtherTorchRebuild()}}))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle torch\._utils\._rebuild_parameter_with_state"):
        load_untrusted(path)
    path.write_bytes(pickle.dumps({"model": {"w": torch.load}}))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle torch\.serialization\.load"):
        load_untrusted(path)
