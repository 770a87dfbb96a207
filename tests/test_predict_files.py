"""``mask2former predict`` over folders and glob patterns: per-file errors, resuming, --overwrite, batching by size."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.cli import main
from mask2former.data.label_space import LabelSpace
from mask2former.apps.predict_files import collect_images, predict_files
from mask2former.modeling.model import Mask2Former

from conftest import tiny_swin_config

LABELS = LabelSpace(["a", "b", "c", "sky", "road"], [True, True, True, False, False])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mask2Former(tiny_swin_config(), labels=LABELS.to_dict()).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(path)
    return path


class CountingForward:
    """Wraps ``model.forward``: how many forwards, and the batch shapes they got."""

    def __init__(self, model, monkeypatch):
        self.shapes = []
        original = model.forward

        def forward(images, *args, **kwargs):
            self.shapes.append(tuple(images.shape))
            return original(images, *args, **kwargs)

        monkeypatch.setattr(model, "forward", forward)

    @property
    def images(self):
        return sum(shape[0] for shape in self.shapes)


def write_images(folder, sizes, seed=0, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (height, width) in enumerate(sizes):
        path = folder / f"{prefix}{index:02d}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def results_files(out, task):
    """Everything a run leaves that describes its results (the records folder aside), as comparable values."""
    found = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if path.is_dir() or relative.parts[0].startswith("."):
            continue
        if path.suffix == ".json":
            found[str(relative)] = json.loads(path.read_text())
        else:
            found[str(relative)] = np.asarray(Image.open(path)).tobytes()
    return found


def test_corrupt_and_non_image_files_are_reported_and_skipped(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    write_images(folder, [(48, 64)] * 3)
    good = (folder / "img00.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(["predict", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--batch-size", "2"])
    assert code == 1
    error = capsys.readouterr().err
    assert "2 input(s) failed" in error
    lines = [line for line in error.splitlines() if line.startswith("  ")]
    assert len(lines) == 2 and "broken.png" in lines[0] and "notes.txt" in lines[1]
    assert "truncated or corrupt" in lines[0] and "not a recognised image format" in lines[1]
    summary = json.loads((out / "summary.json").read_text())
    assert [Path_name(e["file"]) for e in summary["errors"]] == ["broken.png", "notes.txt"]
    assert [image["image_id"] for image in summary["images"]] == ["img00", "img01", "img02"]
    panoptic = json.loads((out / "panoptic.json").read_text())
    assert [entry["image_id"] for entry in panoptic["annotations"]] == ["img00", "img01", "img02"]
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["img00.png", "img01.png", "img02.png"]
    assert (out / "img02_panoptic.png").is_file() and not (out / "broken_panoptic.png").exists()


def Path_name(name):
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def test_folders_and_glob_patterns(tmp_path):
    folder = tmp_path / "data"
    write_images(folder, [(8, 8)] * 2, prefix="a")
    write_images(folder / "sub", [(8, 8)], prefix="b")
    (folder / "c.jpg").write_bytes(b"")
    (folder / ".hidden.png").write_bytes(b"")
    files, errors = collect_images([folder])
    assert [p.name for p in files] == ["a00.png", "a01.png", "c.jpg"] and errors == []  # no subfolder, no dotfile
    files, _ = collect_images([folder], recursive=True)
    assert [p.relative_to(folder).as_posix() for p in files] == ["a00.png", "a01.png", "c.jpg", "sub/b00.png"]
    files, _ = collect_images([f"{folder}/*.png"])
    assert [p.name for p in files] == ["a00.png", "a01.png"]
    files, _ = collect_images([f"{folder}/**/*.png"])
    assert [p.name for p in files] == ["a00.png", "a01.png", "b00.png"]
    # Duplicates are taken once; a pattern without matches is an error that names it; a plain missing file is kept
    # (it fails when read, as a per-file error).
    files, errors = collect_images([folder / "a01.png", f"{folder}/a*.png", f"{folder}/*.gif", folder / "nope.png"])
    assert [p.name for p in files] == ["a01.png", "a00.png", "nope.png"]
    assert errors == [(f"{folder}/*.gif", "no file matches this pattern")]


def test_glob_through_the_cli_and_missing_inputs(checkpoint, tmp_path, capsys):
    folder = tmp_path / "data"
    write_images(folder, [(40, 40)] * 2, prefix="a")
    write_images(folder, [(40, 40)], prefix="b")
    out = tmp_path / "out"
    assert main(["predict", f"{folder}/a*.png", "--checkpoint", str(checkpoint), "--out", str(out), "--task",
                 "semantic"]) == 0
    assert sorted(p.name for p in (out / "semantic").iterdir()) == ["a00.png", "a01.png"]
    assert main(["predict", f"{folder}/z*.png", "--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    assert "no image files found" in capsys.readouterr().err


def test_same_stem_in_two_folders_is_refused(model, tmp_path):
    write_images(tmp_path / "x", [(8, 8)])
    write_images(tmp_path / "y", [(8, 8)])
    with pytest.raises(ValueError, match="same file stem 'img00'"):
        predict_files([tmp_path / "x", tmp_path / "y"], model=model, out_dir=tmp_path / "out")


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_resume_skips_done_images_and_ends_as_a_fresh_run(model, tmp_path, monkeypatch, task):
    folder = tmp_path / "images"
    write_images(folder, [(48, 64), (64, 48), (48, 64), (40, 40), (48, 64)])
    options = dict(model=model, task=task, batch_size=1, progress=False)
    fresh = tmp_path / "fresh"
    report = predict_files([folder], out_dir=fresh, **options)
    assert report.predicted == 5 and report.resumed == 0 and report.errors == []

    resumed = tmp_path / "resumed"
    calls = CountingForward(model, monkeypatch)
    predict_files([f"{folder}/img0[0-2].png"], out_dir=resumed, **options)  # a first run over part of the folder
    assert calls.images == 3
    # An interrupted image: its PNGs may be there, its record not (the record is written last).
    (resumed / ".predict" / task / "img01.json").unlink()
    report = predict_files([folder], out_dir=resumed, **options)
    assert calls.images == 3 + 3 and report.predicted == 3 and report.resumed == 2
    assert results_files(resumed, task) == results_files(fresh, task)

    report = predict_files([folder], out_dir=resumed, **options)  # all done: no forward at all
    assert calls.images == 6 and report.predicted == 0 and report.resumed == 5
    report = predict_files([folder], out_dir=resumed, overwrite=True, **options)
    assert calls.images == 11 and report.predicted == 5 and report.resumed == 0
    assert results_files(resumed, task) == results_files(fresh, task)


def test_resume_redoes_changed_files_and_refuses_other_settings(model, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    paths = write_images(folder, [(32, 32)] * 3)
    out = tmp_path / "out"
    predict_files([folder], model=model, out_dir=out, task="semantic", overlays=False, progress=False)
    calls = CountingForward(model, monkeypatch)
    write_images(tmp_path / "other", [(40, 32)])[0].replace(paths[1])  # a different picture under the same name
    predict_files([folder], model=model, out_dir=out, task="semantic", overlays=False, progress=False)
    assert calls.images == 1 and np.asarray(Image.open(out / "semantic" / "img01.png")).shape == (40, 32)
    # Overlays asked for now, not written before: those images are predicted again.
    predict_files([folder], model=model, out_dir=out, task="semantic", progress=False)
    assert calls.images == 4 and (out / "img00_semantic.png").is_file()
    with pytest.raises(ValueError, match="precision='fp32', not 'bf16'; pass --overwrite"):
        predict_files([folder], model=model, out_dir=out, task="semantic", precision="bf16", progress=False)


def test_batching_by_size_gives_the_results_of_batch_size_one(model, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    # Sizes padding to 64x64 (x4), 32x64 (x2) and 64x32 (x1), interleaved (size_divisibility 32).
    sizes = [(64, 64), (30, 50), (60, 64), (64, 20), (33, 64), (50, 50), (20, 40)]
    write_images(folder, sizes)
    calls = CountingForward(model, monkeypatch)
    for task in ("semantic", "instance"):
        predict_files([folder], model=model, task=task, out_dir=tmp_path / "batched", batch_size=3, progress=False)
        # One padded size per batch, full batches first, the rest at the end.
        assert sorted(calls.shapes) == sorted([(3, 3, 64, 64), (1, 3, 64, 64), (2, 3, 32, 64), (1, 3, 64, 32)])
        calls.shapes.clear()
        predict_files([folder], model=model, task=task, out_dir=tmp_path / "single", batch_size=1, progress=False)
        assert len(calls.shapes) == len(sizes) and all(shape[0] == 1 for shape in calls.shapes)
        calls.shapes.clear()

    for index in range(len(sizes)):
        batched = np.asarray(Image.open(tmp_path / "batched" / "semantic" / f"img{index:02d}.png"))
        single = np.asarray(Image.open(tmp_path / "single" / "semantic" / f"img{index:02d}.png"))
        assert batched.shape == sizes[index] and np.array_equal(batched, single)
    batched = json.loads((tmp_path / "batched" / "instances.json").read_text())
    single = json.loads((tmp_path / "single" / "instances.json").read_text())
    assert len(batched) == len(single) > 0
    for one, other in zip(batched, single):
        assert (one["image_id"], one["category_id"]) == (other["image_id"], other["category_id"])
        assert one["score"] == pytest.approx(other["score"], abs=1e-5)
        assert one["segmentation"]["size"] == other["segmentation"]["size"]
    assert [e["image_id"] for e in batched] == sorted(e["image_id"] for e in batched)  # in input order


def test_min_size_resize_in_the_decoders_gives_the_predictors_results(model, tmp_path, monkeypatch):
    """Images are resized in the decode threads and batched by their resized padded size; results and overlays
    come at the original size, as ``Predictor(min_size=...)`` gives them."""
    from mask2former.inference.predictor import Predictor

    folder = tmp_path / "images"
    sizes = [(40, 60), (80, 120), (64, 64)]  # -> 32x48, 32x48, 32x32 (min_size 32)
    paths = write_images(folder, sizes)
    calls = CountingForward(model, monkeypatch)
    report = predict_files([folder], model=model, task="semantic", out_dir=tmp_path / "out", min_size=32,
                           batch_size=2, progress=False)
    assert report.predicted == 3 and not report.errors
    assert sorted(calls.shapes) == [(1, 3, 32, 32), (2, 3, 32, 64)]
    predictor = Predictor(model, task="semantic", min_size=32)
    to_dataset = np.array([LABELS.to_dataset(i) for i in range(LABELS.num_classes)])
    for path, size in zip(paths, sizes):
        written = np.asarray(Image.open(tmp_path / "out" / "semantic" / f"{path.stem}.png"))
        assert written.shape == size and np.array_equal(written, to_dataset[predictor(path).numpy()])
        with Image.open(tmp_path / "out" / f"{path.stem}_semantic.png") as overlay:
            overlay.load()  # a complete PNG (written at compression level 1)
            assert overlay.size[0] >= size[1] and overlay.size[1] >= size[0]  # the image, and a legend


def test_gate_holds_worker_tasks_while_the_model_runs_and_waits_for_running_ones():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from mask2former.apps.predict_pipeline import Gate

    gate, events = Gate(enabled=True), []
    task_may_end, forward_may_end = threading.Event(), threading.Event()

    def task(name, wait=None):
        events.append(f"{name} start")
        if wait is not None:
            wait.wait(5)
        events.append(f"{name} end")

    def forward():
        with gate.closed():
            events.append("forward")
            forward_may_end.wait(5)

    def wait_for(event):
        deadline = time.monotonic() + 5
        while event not in events and time.monotonic() < deadline:
            time.sleep(0.001)

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(gate.after, task, "running", task_may_end)
        wait_for("running start")
        model = threading.Thread(target=forward)
        model.start()
        time.sleep(0.05)
        assert "forward" not in events  # closing waits for the task already running
        task_may_end.set()
        wait_for("forward")
        assert events == ["running start", "running end", "forward"]
        held = pool.submit(gate.after, task, "held")
        time.sleep(0.05)
        assert "held start" not in events  # a task submitted while the model runs waits for it
        forward_may_end.set()
        model.join(5)
        held.result(5)
        running.result(5)
    assert events[-2:] == ["held start", "held end"]

    disabled, order = Gate(enabled=False), []
    with disabled.closed():
        disabled.after(order.append, "ran")  # CUDA models: nothing waits
    assert order == ["ran"]
