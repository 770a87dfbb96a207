"""The examples in README.md and docs/parity.md that are marked ``<!-- example: run by tests/test_doc_examples.py -->``
run as written: each ``mask2former`` line of a bash block through the CLI's ``main``, each python block with
``exec``, in a fresh folder that holds ``runs/fashion_scenes/model_final`` (the default model, trained for 2 steps)
and a tiny official-layout ``swin_tiny_patch4_window7_224.pth``. What they claim is checked after them."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from mask2former.cli import main

from test_backbone_weights import TINY_SWIN, _official_swin_state
from test_train import train_tiny

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- example: run by tests/test_doc_examples.py -->"
BLOCK = re.compile(re.escape(MARKER) + r"\n```(bash|python)\n(.*?)\n```", re.DOTALL)


def examples(document: str) -> list[tuple[str, str]]:
    text = (ROOT / document).read_text()
    found = BLOCK.findall(text)
    assert len(found) == text.count(MARKER), f"{document}: a marker not followed by a bash/python block"
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("work")
    train_tiny(folder / 'runs' / 'fashion_scenes')
    return folder / "runs"


@pytest.fixture
def workdir(runs, tmp_path, monkeypatch) -> Path:
    (tmp_path / "runs").symlink_to(runs, target_is_directory=True)
    state = _official_swin_state(TINY_SWIN["embed_dim"], TINY_SWIN["depths"], TINY_SWIN["num_heads"],
                                 TINY_SWIN["window_size"], num_classes=10)
    torch.save({"model": state}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(kind: str, code: str) -> None:
    if kind == "python":
        exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})
        return
    for line in code.splitlines():
        if line.strip() and not line.startswith("#"):
            words = shlex.split(line)
            assert words[0] == "mask2former", line
            assert main(words[1:]) == 0, line


def test_parity_examples(workdir):
    found = examples("docs/parity.md")
    assert [kind for kind, _ in found] == ["python", "bash"]
    for kind, code in found:
        run(kind, code)
    assert (workdir / "swin_tiny_patch4_window7_224.pkl").is_file()  # the converter's output, read back above
    # What the text says: the same AP on the panoptic and the instance annotations, in the data set's ids.
    full = json.loads((workdir / "out" / "panoptic.json").read_text())
    subset = json.loads((workdir / "out" / "instances.json").read_text())
    assert {"PQ", "mIoU", "AP"} <= full["metrics"].keys()
    assert subset["details"]["instance"] == full["details"]["instance"]
    detections = json.loads((workdir / "out" / "predictions" / "instances.json").read_text())
    assert detections and {entry["category_id"] for entry in detections} <= set(range(1, 11))


def test_readme_examples(workdir, capsys):
    found = examples("README.md")
    assert [kind for kind, _ in found] == ["bash"]
    for kind, code in found:
        run(kind, code)
    printed = capsys.readouterr().out
    assert "scored on the data set's 10 of the model's" in printed and "AP" in printed
