"""evaluate / validation / predict over 2 gloo processes on CPU, against one process on the same images.

The oracle is the one-process run: metrics equal to the last bit (the shards are whole batches and rank 0 merges
in data set order), the same results files, the same merged predict outputs. Bad input: a data set shorter than
the world size, a broken image on one rank, a rank that dies mid-run."""

import json
import os
import pickle
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mask2former.apps.predict_files import predict_files
from mask2former.apps.predict_shards import merge_predictions, parse_shard, predict_shard
from mask2former.cli import main
from mask2former.data import FashionScenes
from mask2former.evaluation.evaluator import evaluate_model
from mask2former.modeling.model import Mask2Former
from mask2former.training.distributed import shard_range

from conftest import tiny_swin_config

WORLD_SIZE = 2
LABELS = FashionScenes.label_space
# A random tiny model scores every class near 1/14: keep all its queries so that there is something to match.
OPTIONS = dict(object_mask_threshold=0.0, overlap_threshold=0.5, top_k=100, batch_size=2)


def val_data(num_images=5):
    return FashionScenes("val", num_images=num_images, seed=1, image_size=(40, 48), source="subset")


class Broken(torch.utils.data.Dataset):
    """``data`` whose item ``bad`` cannot be read (as a reader reports a corrupt file), or kills its process."""

    def __init__(self, data, bad, die=False):
        self.data, self.bad, self.die = data, bad, die

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if index == self.bad:
            if self.die:
                os._exit(3)
            raise ValueError(f"truncated or corrupt image file scene{index}.png: image file is truncated")
        return self.data[index]


class NoisyOracle(Mask2Former):
    """A tiny Mask2Former whose forward recognises each image of ``data`` and answers with its ground truth,
    mask logits blurred by fixed noise: PQ, AP and mIoU strictly between 0 and 100, with non-round float sums
    (what a random model, which matches nothing, cannot give)."""

    def __init__(self, data):
        super().__init__(tiny_swin_config(num_classes=LABELS.num_classes, dec_layers=2, enc_layers=1),
                         labels=LABELS.to_dict())
        self.samples = [data[i] for i in range(len(data))]
        self.size = tuple(self.samples[0]["image"].shape[-2:])
        self.index = {sample["image"].numpy().tobytes(): i for i, sample in enumerate(self.samples)}

    def forward(self, images, *args, aux_outputs=True):
        batch, _, height, width = images.shape
        queries, classes = self.config.num_queries, self.num_classes
        logits = torch.full((batch, queries, classes + 1), -4.0)
        logits[..., classes] = 4.0
        masks = torch.full((batch, queries, height // 4, width // 4), -8.0)
        h, w = self.size
        for b in range(batch):
            raw = (images[b, :, :h, :w] * self.pixel_std + self.pixel_mean).round().clamp(0, 255).to(torch.uint8)
            index = self.index[raw.numpy().tobytes()]
            sample = self.samples[index]
            generator = torch.Generator().manual_seed(index)
            for q, (label, mask) in enumerate(zip(sample["labels"][:queries], sample["masks"][:queries])):
                logits[b, q, classes] = -4.0
                logits[b, q, int(label)] = 4.0 + torch.rand((), generator=generator).item()
                small = torch.nn.functional.interpolate(mask[None, None].float(), size=(h // 4, w // 4),
                                                        mode="area")[0, 0]
                masks[b, q, : h // 4, : w // 4] = (small * 2 - 1) * 3 + torch.randn(small.shape, generator=generator) * 2
        return type("Output", (), {"pred_logits": logits, "pred_masks": masks})()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = Mask2Former(tiny_swin_config(num_classes=LABELS.num_classes, dec_layers=2, enc_layers=1),
                        labels=LABELS.to_dict()).eval()
    path = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(path)
    return path


def write_images(folder, count, broken=()):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    for index in range(count):
        path = folder / f"img{index:02d}.png"
        if index in broken:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        else:
            size = (32, 40) if index % 2 else (40, 32)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def folder_contents(out):
    """Every results file of a folder (records aside), comparable: JSON as values, PNGs as bytes of pixels."""
    from PIL import Image

    found = {}
    for path in sorted(Path(out).rglob("*")):
        relative = path.relative_to(out)
        if path.is_dir() or relative.parts[0].startswith("."):
            continue
        found[str(relative)] = (json.loads(path.read_text()) if path.suffix == ".json"
                                else np.asarray(Image.open(path)).tobytes())
    return found


# ----------------------------------------------------------------------------------------------- process harness


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, port, root, scenario, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mask2former.training import distributed as dist_utils

    dist_utils.init_distributed("cpu", timeout_minutes=timeout_s / 60)
    started = time.perf_counter()
    try:
        outcome = {"ok": scenario(rank, Path(root))}
        print(f"rank {rank}: {scenario.__name__} {time.perf_counter() - started:.1f} s", flush=True)
    except Exception as error:  # noqa: BLE001 - the parent asserts on it
        outcome = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    with open(Path(root) / f"rank{rank}.pkl", "wb") as file:
        pickle.dump(outcome, file)
    torch.distributed.destroy_process_group()


def run_ranks(scenario, root, timeout_s=60.0, wait_s=240.0):
    """``scenario(rank, root)`` in 2 spawned processes (a process group with ``timeout_s``); per rank
    ``{"ok": value}`` or ``{"error": message}``, or None for a process that wrote nothing (it died)."""
    # fork: the children start with this process's imports (spawn re-imports torch: ~15 s each on a busy 2-core
    # machine); safe here because the parent runs torch on one thread (no OpenMP pool to inherit)
    context = mp.get_context("fork")
    port = _free_port()
    processes = [context.Process(target=_entry, args=(rank, port, str(root), scenario, timeout_s))
                 for rank in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + wait_s
    for process in processes:
        process.join(max(deadline - time.monotonic(), 1))
        if process.is_alive():
            process.kill()
            pytest.fail("a rank did not finish in time")
    outcomes = []
    for rank in range(WORLD_SIZE):
        path = Path(root) / f"rank{rank}.pkl"
        outcomes.append(pickle.loads(path.read_bytes()) if path.exists() else None)
    return outcomes


def _load(root):
    return Mask2Former.from_pretrained(root / "model").eval()


# ----------------------------------------------------------------------------------------------- scenarios


def _evaluate_scenario(rank, root):
    model = NoisyOracle(val_data(7))
    results = {}
    # 7 images in batches of 2: rank 0 gets batches [0, 1] [2, 3], rank 1 [4, 5] [6] (uneven, and a short batch)
    t0 = time.perf_counter()
    results["seven"] = evaluate_model(model, val_data(7), LABELS, save_predictions=root / "eval_out", **OPTIONS)
    # world size > number of images: rank 1 has nothing to do
    results["one"] = evaluate_model(NoisyOracle(val_data(1)), val_data(1), LABELS, **OPTIONS)
    (root / "stale").mkdir(exist_ok=True)
    if rank == 0:
        (root / "stale" / "panoptic.json").write_text('{"annotations": []}')
    try:  # item 4 is rank 1's: it fails, rank 0 hears of it
        evaluate_model(model, Broken(val_data(7), bad=4), LABELS, save_predictions=root / "stale", **OPTIONS)
    except Exception as error:  # noqa: BLE001
        results["broken"] = f"{type(error).__name__}: {error}"
    print(f"rank {rank}: evaluate {time.perf_counter() - t0:.1f} s", flush=True)
    # predict under the process group: 5 files, img03 (rank 1's) corrupt
    from mask2former.apps.predict_shards import predict_distributed

    report, merged = predict_distributed([root / "images"], out_dir=root / "predict_out", checkpoint=str(root / "model"),
                                         batch_size=1, workers=1, overlays=True)
    results["predict"] = {"rank_files": [str(p) for p in report.shard_files], "merged": dict(merged)}
    return results


def _validation_scenario(rank, root):
    from test_trainer import BoxScenes, tiny_config

    from mask2former.apps.train import build_evaluate_fn
    from mask2former.config import TestConfig
    from mask2former.training.trainer import Trainer
    import dataclasses

    config = tiny_config(root / "train", max_iter=2, batch_size=2, train={"checkpoint_period": 0, "eval_period": 1})
    config = dataclasses.replace(config, test=TestConfig(object_mask_threshold=0.0, overlap_threshold=0.5, top_k=100,
                                                         min_size=0, max_size=0))
    trainer = Trainer(config, train_dataset=BoxScenes(num_images=4), val_dataset=val_data(5), label_space=LABELS,
                      evaluate_fn=build_evaluate_fn(config, LABELS), device="cpu", progress_bar=False,
                      tensorboard=False)
    calls = []
    original = trainer.evaluate_fn
    trainer.evaluate_fn = lambda model, data: calls.append(1) or original(model, data)
    trainer.fit()
    if rank == 0:
        trainer.model.save_pretrained(root / "trained")
    return {"metrics": trainer.last_metrics, "calls": len(calls)}


def _dying_scenario(rank, root):
    model = _load(root)
    # rank 1 dies reading its first image (index 4 of 8 in batches of 2), before any collective
    return evaluate_model(model, Broken(val_data(8), bad=4, die=True), LABELS, save_predictions=root / "dying",
                          **OPTIONS)


# ----------------------------------------------------------------------------------------------- tests


def _same_result(a, b):
    np.testing.assert_equal(a["metrics"], b["metrics"])  # exactly: floats to the last bit (NaN equal to NaN)
    np.testing.assert_equal(a["details"], b["details"])
    assert a["num_images"] == b["num_images"] and a["table"] == b["table"]


def test_evaluate_and_predict_on_two_processes_equal_one_process(checkpoint, tmp_path):
    root = tmp_path
    (root / "model").symlink_to(checkpoint)
    write_images(root / "images", 5, broken={3})
    outcomes = run_ranks(_evaluate_scenario, root)
    for outcome in outcomes:
        assert outcome is not None and "ok" in outcome, outcome and outcome.get("traceback")
    torch.set_num_threads(1)
    single = evaluate_model(NoisyOracle(val_data(7)), val_data(7), LABELS, save_predictions=root / "single_out",
                            **OPTIONS)
    for key in ("PQ", "PQ_th", "PQ_st", "AP", "mIoU"):  # a real comparison: partly right predictions
        assert 1 < single["metrics"][key] < 95, (key, single["metrics"])
    for outcome in outcomes:  # every rank returns rank 0's merged result
        _same_result(outcome["ok"]["seven"], single)
        _same_result(outcome["ok"]["one"], evaluate_model(NoisyOracle(val_data(1)), val_data(1), LABELS, **OPTIONS))
    assert single["num_images"] == 7
    one_process_files = folder_contents(root / "single_out")
    assert len(json.loads((root / "single_out" / "panoptic.json").read_text())["annotations"]) == 7
    assert folder_contents(root / "eval_out") == one_process_files

    # a broken image on rank 1: both ranks stop with its message, and no results JSON is left (the stale one is gone)
    for outcome in outcomes:
        message = outcome["ok"]["broken"]
        assert "process 1 of 2 failed" in message and "scene4.png" in message and "\n" not in message
    assert not (root / "stale" / "panoptic.json").exists() and not (root / "stale" / "instances.json").exists()

    # predict: each rank its contiguous part of the sorted files; the merge equals one process, errors included
    parts = [outcome["ok"]["predict"]["rank_files"] for outcome in outcomes]
    assert [Path(p).name for p in parts[0]] == ["img00.png", "img01.png", "img02.png"]
    assert [Path(p).name for p in parts[1]] == ["img03.png", "img04.png"]
    merged = outcomes[0]["ok"]["predict"]["merged"]
    assert merged["images"] == 4 and [Path(name).name for name, _ in merged["errors"]] == ["img03.png"]
    reference = predict_files([root / "images"], checkpoint=str(root / "model"), out_dir=root / "predict_single",
                              batch_size=1, workers=1, overlays=True)  # batch size 1: see test_independent_shards_merge_into_the_one_process_outputs
    assert [Path(name).name for name, _ in reference.errors] == ["img03.png"]
    distributed_files = folder_contents(root / "predict_out")
    assert distributed_files == folder_contents(root / "predict_single")
    summary = distributed_files["summary.json"]
    assert [Path(entry["file"]).name for entry in summary["errors"]] == ["img03.png"]
    assert "truncated" in summary["errors"][0]["error"] or "cannot read" in summary["errors"][0]["error"]


def test_validation_in_training_runs_on_every_rank_with_the_one_process_numbers(tmp_path):
    outcomes = run_ranks(_validation_scenario, tmp_path)
    for outcome in outcomes:
        assert outcome is not None and "ok" in outcome, outcome and outcome.get("traceback")
    assert [outcome["ok"]["calls"] for outcome in outcomes] == [2, 2]  # no rank idles at a barrier
    np.testing.assert_equal(outcomes[0]["ok"]["metrics"], outcomes[1]["ok"]["metrics"])
    torch.set_num_threads(1)
    from mask2former.config import TestConfig

    options = TestConfig(object_mask_threshold=0.0, overlap_threshold=0.5, top_k=100, min_size=0,
                         max_size=0).predictor_options()
    alone = evaluate_model(Mask2Former.from_pretrained(tmp_path / "trained").eval(), val_data(5), LABELS,
                           device="cpu", **options)  # what rank 0 alone computed before
    assert alone["metrics"]["mIoU"] > 0
    np.testing.assert_equal(outcomes[0]["ok"]["metrics"], alone["metrics"])  # to the last bit


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(checkpoint, tmp_path):
    (tmp_path / "model").symlink_to(checkpoint)
    started = time.monotonic()
    outcomes = run_ranks(_dying_scenario, tmp_path, timeout_s=20.0)
    assert outcomes[1] is None  # it died without a word
    message = outcomes[0]["error"]
    assert message.startswith("ShardError: evaluate: lost contact with another process"), message
    assert time.monotonic() - started < 120
    assert not (tmp_path / "dying" / "panoptic.json").exists()
    assert not (tmp_path / "dying" / "instances.json").exists()


# ----------------------------------------------------------------------------------------------- without a group


def test_shard_range_covers_every_item_once_in_order():
    for length in range(0, 12):
        for count in range(1, 6):
            for block in (1, 2, 3):
                parts = [shard_range(length, index, count, block) for index in range(count)]
                assert [i for part in parts for i in part] == list(range(length))
                sizes = [len(part) for part in parts]
                # whole blocks, spread as evenly as blocks allow (a short last block aside)
                assert all(part.start % block == 0 for part in parts if len(part))
                blocks = [-(-size // block) for size in sizes]
                assert max(blocks) - min(blocks) <= 1
    assert list(shard_range(5, 1, 2, 2)) == [4] and list(shard_range(1, 1, 2)) == []
    with pytest.raises(ValueError, match="shard 2 of 2"):
        shard_range(5, 2, 2)


def test_independent_shards_merge_into_the_one_process_outputs(checkpoint, tmp_path):
    write_images(tmp_path / "images", 5, broken={1})
    # batch size 1: a batch of other images changes scores in the last float bits, and a part's batches hold
    # other images than one process's (as a resumed run's do)
    options = dict(checkpoint=str(checkpoint), batch_size=1, workers=1, overlays=True, task="instance")
    predict_files([tmp_path / "images"], out_dir=tmp_path / "single", **options)
    # three jobs into one shared folder (part 2 first: order does not matter)
    for index in (2, 0):
        predict_shard([tmp_path / "images"], (index, 3), out_dir=tmp_path / "shared", **options)
    with pytest.raises(ValueError, match=r"1 of 3 parts have not finished .*00001-of-00003.json.*--shard 1/3"):
        merge_predictions([tmp_path / "shared"])
    assert not (tmp_path / "shared" / "instances.json").exists()
    predict_shard([tmp_path / "images"], (1, 3), out_dir=tmp_path / "shared", **options)
    merged = merge_predictions([tmp_path / "shared"])
    assert merged["parts"] == 3 and merged["images"] == 4 and len(merged["errors"]) == 1
    expected = folder_contents(tmp_path / "single")
    assert folder_contents(tmp_path / "shared") == expected
    # two jobs on machines without a shared disk: their folders merged into a third one
    for index in range(2):
        predict_shard([tmp_path / "images"], (index, 2), out_dir=tmp_path / f"node{index}", **options)
    code = main(["predict-merge", str(tmp_path / "node0"), str(tmp_path / "node1"), "--out", str(tmp_path / "joined")])
    assert code == 1  # one input failed, as the one-process run says
    assert folder_contents(tmp_path / "joined") == expected
    # resume: a part run again predicts nothing new
    again = predict_shard([tmp_path / "images"], (0, 2), out_dir=tmp_path / "node0", **options)
    assert again.predicted == 0 and again.resumed == 2


def test_shard_argument_errors(capsys, tmp_path):
    assert parse_shard("3/4") == (3, 4)
    for text, needle in (("4/4", "I counts from 0"), ("1-4", "expected I/N"), ("0/0", "I counts from 0")):
        with pytest.raises(ValueError, match=needle):
            parse_shard(text)
    assert main(["predict-merge", str(tmp_path)]) == 1
    assert "no parts found" in capsys.readouterr().err


def test_merged_panoptic_statistics_equal_one_pass_to_the_last_bit():
    """Shards merged on rank 0 re-add the per-image IoU sums in image order: a plain sum of the shards' totals
    would round differently (checked on a case where it does)."""
    from mask2former.evaluation.panoptic import PanopticEvaluator

    def image(gt_area, pred_area, overlap):  # one row: IoU = overlap / (gt_area + pred_area - overlap)
        width = gt_area + pred_area - overlap
        gt, pred = torch.full((1, width), 2, dtype=torch.int32), torch.zeros(1, width, dtype=torch.int32)
        gt[0, :gt_area] = 1  # the rest is segment 2 of the other class, not void (void leaves the union)
        pred[0, gt_area - overlap:] = 1
        return pred, [{"id": 1, "category_id": 0}], gt, [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}]

    cases = [image(3, 3, 3), image(3, 4, 3), image(3, 5, 3), image(4, 5, 4)]  # IoU 1, 0.75, 0.6, 0.8
    one = PanopticEvaluator([True, False])
    for case in cases:
        one.update(*case)
    first, second = PanopticEvaluator([True, False]), PanopticEvaluator([True, False])
    for case in cases[:2]:
        first.update(*case)
    for case in cases[2:]:
        second.update(*case)
    assert first.iou[0] + second.iou[0] != one.iou[0]  # the case tells the two summation orders apart
    first.merge(second)
    assert first.iou.tolist() == one.iou.tolist() and first.tp.tolist() == one.tp.tolist() == [4, 0]
    assert first.compute()["All"] == one.compute()["All"]


def test_more_parts_than_images_leaves_the_extra_parts_empty(checkpoint, tmp_path):
    write_images(tmp_path / "images", 2)
    options = dict(checkpoint=str(checkpoint), batch_size=1, workers=1, overlays=False)
    predict_files([tmp_path / "images"], out_dir=tmp_path / "single", **options)
    sizes = [len(predict_shard([tmp_path / "images"], (index, 4), out_dir=tmp_path / "parts", **options).shard_files)
             for index in range(4)]
    assert sizes == [1, 1, 0, 0]
    assert merge_predictions([tmp_path / "parts"])["images"] == 2
    assert folder_contents(tmp_path / "parts") == folder_contents(tmp_path / "single")
