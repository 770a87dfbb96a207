"""``predict`` split over processes: under ``torchrun`` (one process group), or as independent jobs
(``predict --shard I/N``, e.g. a scheduler's job array) whose outputs ``predict-merge`` joins.

The input files are listed and sorted as one process would (``collect_images``), and part ``I`` of ``N`` takes a
contiguous slice of them (``shard_range``). Each part predicts its slice with ``predict_files`` (its own decode and
write threads, per-image records, resume, per-file errors) into the output folder, then writes a manifest
``OUT/.predict/<task>/shards/IIIII-of-NNNNN.json`` (its files, errors and per-image records) via a temporary name
and a rename. Merging reads the N manifests and writes ``panoptic.json`` / ``instances.json`` and ``summary.json``
exactly as one process over all the files would: parts in order, files in order, the errors of every part.

Under torchrun rank 0 merges as soon as every process has written its part. A process that fails (or dies) makes
every process stop with a one-line error naming it, and no results JSON is written: the ones of an earlier run
are deleted first, so nothing in the folder looks like complete results until the merge. Independent jobs merge
with ``mask2former predict-merge OUT`` once all have finished; a missing part is an error naming it. Jobs that
wrote to different folders (no shared disk) merge with ``predict-merge DIR_0 DIR_1 ... --out OUT``, which copies
their PNGs into ``OUT``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..data.image_io import one_line
from ..data.json_io import dumps
from ..data.label_space import LabelSpace
from ..evaluation import sharding
from ..training import distributed as dist_utils
from .predict_files import RECORDS_DIR, PredictReport, _atomic_write, _write_results, predict_files

__all__ = ["MergeReport", "merge_predictions", "parse_shard", "predict_distributed", "predict_shard"]

SHARDS_DIR = "shards"
_MANIFEST_NAME = re.compile(r"^(\d+)-of-(\d+)\.json$")
_FINAL_FILES = ("panoptic.json", "instances.json", "summary.json")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``: part I (counted from 0, as a job array's task id) of N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of 4 parts")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ValueError(f"--shard {text}: I counts from 0 and must be below N (0/{max(count, 1)} .. "
                         f"{max(count, 1) - 1}/{max(count, 1)})")
    return index, count


def _shards_dir(out: Path, task: str) -> Path:
    return out / RECORDS_DIR / task / SHARDS_DIR


def _manifest_path(out: Path, task: str, index: int, count: int) -> Path:
    return _shards_dir(out, task) / f"{index:05d}-of-{count:05d}.json"


def _clear_stale(out: Path, task: str, count: int) -> None:
    """Results JSONs of an earlier run and manifests of a split into another number of parts."""
    for name in _FINAL_FILES:
        (out / name).unlink(missing_ok=True)
    shards = _shards_dir(out, task)
    if shards.is_dir():
        for path in shards.iterdir():
            match = _MANIFEST_NAME.match(path.name)
            if match and int(match.group(2)) != count:
                path.unlink(missing_ok=True)


def predict_shard(images: Sequence[str | Path], shard: tuple[int, int], out_dir: str | Path = "predictions",
                  task: str = "panoptic", **options: Any) -> PredictReport:
    """Part ``shard = (I, N)`` of a ``predict_files`` run (same keyword arguments), without a process group; its
    manifest is written at the end. Results JSONs appear when ``merge_predictions`` joins the N parts."""
    out = Path(out_dir)
    index, count = shard
    _clear_stale(out, task, count)
    report = predict_files(images, task=task, out_dir=out, shard=shard, **options)
    manifest = {
        "shard": index, "count": count, "task": task, "num_inputs": report.num_inputs,
        "precision": report.precision, "labels": report.label_space.to_dict(),
        "files": [str(path) for path in report.shard_files],
        "errors": [[name, message] for name, message in report.errors],
        "records": report.records,
    }
    path = _manifest_path(out, task, index, count)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, dumps(manifest))
    return report


class MergeReport(dict):
    """``{"out_dir", "task", "parts", "images", "errors": [(file, message)], "files": [paths written]}``."""


def merge_predictions(directories: Sequence[str | Path], out: str | Path | None = None,
                      task: str | None = None) -> MergeReport:
    """Join the parts written by ``predict --shard I/N`` (in one folder, or in ``directories`` copied into
    ``out``) into the results files one process would have written."""
    dirs = [Path(d) for d in directories]
    if not dirs:
        raise ValueError("predict-merge: give the output folder(s) of the parts")
    target = Path(out) if out is not None else dirs[0]
    task = task or _only_task(dirs)
    parts: dict[int, tuple[Path, Path]] = {}
    counts: set[int] = set()
    for directory in dirs:
        shards = _shards_dir(directory, task)
        for path in sorted(shards.glob("*.json")) if shards.is_dir() else []:
            match = _MANIFEST_NAME.match(path.name)
            if not match:
                continue
            index, count = int(match.group(1)), int(match.group(2))
            counts.add(count)
            if index in parts:
                raise ValueError(f"predict-merge: part {index} is in both {parts[index][1]} and {path}")
            parts[index] = (directory, path)
    if not counts:
        raise FileNotFoundError(f"predict-merge: no parts of a {task} run in {', '.join(map(str, dirs))} (expected "
                                f"{RECORDS_DIR}/{task}/{SHARDS_DIR}/I-of-N.json, written by predict --shard I/N)")
    if len(counts) > 1:
        raise ValueError(f"predict-merge: parts of runs split {sorted(counts)} ways are mixed in "
                         f"{', '.join(map(str, dirs))}; delete the older run's {SHARDS_DIR}/ files")
    count = counts.pop()
    missing = [index for index in range(count) if index not in parts]
    if missing:
        raise ValueError(f"predict-merge: {len(missing)} of {count} parts have not finished (no "
                         f"{_manifest_path(dirs[0], task, missing[0], count)}); run predict --shard "
                         f"{missing[0]}/{count} for it")
    records: list[dict[str, Any]] = []
    errors: list[tuple[str, str]] = []
    first: dict[str, Any] | None = None
    for index in range(count):
        directory, path = parts[index]
        manifest = _load_manifest(path)
        if first is None:
            first = manifest
        for key in ("num_inputs", "precision", "labels"):
            if manifest[key] != first[key]:
                raise ValueError(f"predict-merge: {path} has {key}={manifest[key]!r}, part 0 has {first[key]!r}; "
                                 f"the parts come from different runs")
        errors.extend((name, message) for name, message in manifest["errors"])
        for record in manifest["records"]:
            _collect_outputs(record, directory, target)
            records.append(record)
    assert first is not None
    files = _write_results(target, task, LabelSpace.from_dict(first["labels"]), first["precision"], records, errors)
    return MergeReport(out_dir=target, task=task, parts=count, images=len(records), errors=errors, files=files)


def _only_task(dirs: list[Path]) -> str:
    tasks = sorted({path.parent.name for directory in dirs
                    for path in (directory / RECORDS_DIR).glob(f"*/{SHARDS_DIR}")})
    if len(tasks) != 1:
        raise ValueError(f"predict-merge: {'no parts found' if not tasks else 'parts of tasks ' + ', '.join(tasks)} "
                         f"in {', '.join(map(str, dirs))}; {'' if not tasks else 'choose one with --task'}".rstrip("; "))
    return tasks[0]


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"predict-merge: cannot read {path}: {one_line(error)}") from None
    keys = ("shard", "count", "num_inputs", "precision", "labels", "files", "errors", "records")
    if not isinstance(manifest, dict) or any(key not in manifest for key in keys):
        raise ValueError(f"predict-merge: {path} is not a part manifest (needs {', '.join(keys)})")
    return manifest


def _collect_outputs(record: dict[str, Any], directory: Path, target: Path) -> None:
    """The image's output files are in ``target`` (copied from ``directory`` when that is another folder)."""
    for name in record["outputs"]:
        source, destination = directory / name, target / name
        if not source.is_file():
            raise FileNotFoundError(f"predict-merge: {source} (an output of {record['summary']['file_name']}) is "
                                    f"missing")
        if source.resolve() != destination.resolve():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)


def predict_distributed(images: Sequence[str | Path], out_dir: str | Path = "predictions", task: str = "panoptic",
                        device: str = "cpu", overwrite: bool = False, progress: bool | None = None,
                        **options: Any) -> tuple[PredictReport, MergeReport]:
    """``predict`` under torchrun: process ``rank`` predicts part ``rank`` of ``world size``, rank 0 merges.
    Returns this process's report and the merged one (the same on every process)."""
    context = dist_utils.init_distributed(device)
    out = Path(out_dir)
    try:
        rank, world = context.rank, context.world_size
        if rank == 0:
            _clear_stale(out, task, world)
            if overwrite:  # afresh, once, before any process writes a record
                shutil.rmtree(out / RECORDS_DIR / task, ignore_errors=True)
        sharding.collective("predict", dist_utils.barrier)
        error, report = None, PredictReport(out_dir=out)
        try:
            report = predict_shard(images, (rank, world), out, task, device=str(context.device), overwrite=overwrite,
                                   progress=progress if rank == 0 else False, **options)
        except Exception as failure:  # noqa: BLE001 - the other processes hear of it below
            if world == 1:
                raise
            error = one_line(failure)
        sharding.check_no_failure(error, "predict")
        merged = sharding.share_result(lambda: merge_predictions([out], task=task), "predict")
        return report, merged
    finally:
        dist_utils.cleanup(context)
