"""Checkpoint names (interop/hub.py): Hugging Face Hub ids from a pre-filled cache with HF_HUB_OFFLINE=1, and
model-zoo downloads from a local HTTP server (complete, cut mid-way, wrong checksum). No network."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_swin_config

from mask2former.config import to_dict
from mask2former.interop import hub
from mask2former.interop.detectron2 import save_detectron2_checkpoint
from mask2former.interop.errors import CheckpointError
from mask2former.modeling.model import Mask2Former

SRC = Path(__file__).resolve().parents[1] / "src"
PAYLOAD = b"\x80\x04" + bytes(range(256)) * 64  # a pickle header and 16 KiB of bytes
MD5 = hashlib.md5(PAYLOAD).hexdigest()


def fill_hub_cache(cache: Path, repo_id: str, folder_files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in folder_files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def run_offline(cache: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"),
               PYTHONPATH=str(SRC))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_hub_id_from_the_offline_cache(tmp_path):
    model = Mask2Former(tiny_swin_config(num_classes=3, dec_layers=1, enc_layers=1))
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "someone/tiny-m2f", {p.name: p.read_bytes() for p in saved.iterdir()})
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    code = (
        "import torch\nfrom mask2former import Mask2Former\n"
        "m = Mask2Former.from_pretrained('someone/tiny-m2f')\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert all(torch.equal(v, expected[k]) for k, v in m.state_dict().items())\n"
        "print('loaded', m.num_classes)\n"
    )
    done = run_offline(cache, code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded 3" in done.stdout
    # Not cached while offline: one line saying what to do.
    missing = run_offline(cache, "from mask2former.interop.hub import resolve_checkpoint\n"
                                 "resolve_checkpoint('someone/other-model')")
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert "not in the Hugging Face cache while offline" in last and "huggingface-cli download someone/other-model" in last


def test_local_path_wins_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "coco_panoptic_r50"
    local.mkdir()
    assert hub.resolve_checkpoint("coco_panoptic_r50") == Path("coco_panoptic_r50")  # no download: the folder wins
    assert hub.zoo_preset("coco_panoptic_r50") is None
    with pytest.raises(CheckpointError, match="not a model-zoo name"):
        hub.resolve_checkpoint("zoo:no_such_model")
    with pytest.raises(CheckpointError, match="does not exist"):
        hub.resolve_checkpoint("runs/x/model_final")  # two slashes: a path, not a Hub id
    with pytest.raises(CheckpointError, match="does not exist"):
        hub.resolve_checkpoint("weights/model.pkl")


def test_missing_hub_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"pip install mask2former\[hub\]"):
        hub.resolve_checkpoint("org/name")


class Handler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []
    payloads: dict[str, bytes] = {}  # path -> body (default PAYLOAD)

    def do_GET(self):  # noqa: N802 - the http.server name
        Handler.requests.append(self.path)
        body = Handler.payloads.get(self.path, PAYLOAD)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/cut/"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-download
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.requests, Handler.payloads = [], {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def zoo(monkeypatch, tmp_path):
    cache = tmp_path / "zoo"
    monkeypatch.setenv("MASK2FORMER_CACHE", str(cache))
    monkeypatch.setitem(hub.ZOO, "tiny_good", hub.ZooEntry(f"t/model_final_{MD5[:6]}.pkl", "x", MD5[:6]))
    monkeypatch.setitem(hub.ZOO, "tiny_bad", hub.ZooEntry("t/model_final_000000.pkl", "x", "000000"))
    return cache


def files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def test_zoo_download_once_into_the_cache(server, zoo, monkeypatch):
    monkeypatch.setenv("MASK2FORMER_ZOO_URL", server + "/good")
    path = hub.resolve_checkpoint("tiny_good")
    assert path == zoo / "t" / f"model_final_{MD5[:6]}.pkl" and path.read_bytes() == PAYLOAD
    assert hub.resolve_checkpoint("zoo:tiny_good") == path
    assert Handler.requests == [f"/good/t/model_final_{MD5[:6]}.pkl"]  # the second call used the cache
    assert files_in(zoo) == [path]
    assert hub.zoo_preset("tiny_good") == "x"


def test_zoo_interrupted_download_leaves_nothing(server, zoo):
    with pytest.raises(CheckpointError) as error:
        hub.download_zoo("tiny_good", base_url=server + "/cut", progress=False)
    message = str(error.value)
    assert "\n" not in message and "interrupted" in message and "nothing was kept" in message
    assert files_in(zoo) == []


def test_zoo_checksum_mismatch_leaves_nothing(server, zoo):
    with pytest.raises(CheckpointError, match=r"checksum mismatch .* nothing was kept"):
        hub.download_zoo("tiny_bad", base_url=server + "/good", progress=False)
    assert files_in(zoo) == []


def test_zoo_unreachable_says_where_to_put_the_file(zoo):
    with pytest.raises(CheckpointError, match=r"download it by hand to .*model_final_000000\.pkl"):
        hub.download_zoo("tiny_bad", base_url="http://127.0.0.1:9", progress=False)
    assert files_in(zoo) == []


def test_zoo_table_uses_official_names():
    for name, entry in hub.ZOO.items():
        assert entry.file_name == f"model_final_{entry.md5_prefix}.pkl", name
        assert (Path(hub.__file__).parents[1] / "configs" / f"{entry.preset}.yaml").exists(), name


def test_from_pretrained_by_zoo_name_end_to_end(server, zoo, monkeypatch, tmp_path):
    """A detectron2 pickle served as a zoo entry: downloaded, checked, converted with the entry's preset."""
    model = Mask2Former(tiny_swin_config(num_classes=3, dec_layers=1, enc_layers=1))
    save_detectron2_checkpoint(model, tmp_path / "model.pkl")
    data = (tmp_path / "model.pkl").read_bytes()
    digest = hashlib.md5(data).hexdigest()[:6]
    preset = tmp_path / "tiny_preset.yaml"
    preset.write_text(yaml.safe_dump({"model": to_dict(model.config)}))
    monkeypatch.setitem(hub.ZOO, "tiny_real", hub.ZooEntry(f"r/model_final_{digest}.pkl", str(preset), digest))
    Handler.payloads[f"/good/r/model_final_{digest}.pkl"] = data
    monkeypatch.setenv("MASK2FORMER_ZOO_URL", server + "/good")
    loaded = Mask2Former.from_pretrained("zoo:tiny_real")
    expected = model.state_dict()
    assert loaded.num_classes == 3 and all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
