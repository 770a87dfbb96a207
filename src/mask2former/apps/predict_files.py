"""``mask2former predict``: run a checkpoint (or an exported ONNX model) on image files, folders and glob patterns
and write the standard results files (COCO panoptic results, the COCO results list with RLE masks, or label PNGs
in the data set's values), a PNG overlay per image and a readable ``summary.json``.

The run is a pipeline (``predict_pipeline``): worker threads decode (and resize) images into a bounded prefetch
queue, the main thread batches images of the same padded size and runs the model, and worker threads post-process
each image and write its outputs (overlay drawing, PNG and RLE encoding); on a CPU the workers wait while the model
runs. A file that cannot be read is an error for that file only: it is listed at the end and the others go on.

Resuming: each finished image leaves a record ``OUT/.predict/<task>/<stem>.json`` (its summary entry and its JSON
results entries), written after its PNGs. A later run into the same folder skips images whose record and output
files exist (``overwrite=True`` redoes everything) and assembles the results JSONs from the records of all its
input images, so they are complete however many runs it took.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from ..data.json_io import dumps
from ..data.label_space import LabelSpace
from ..evaluation.results_files import RESULT_FILES, ResultsWriter
from ..viz import visualize
from ..inference.predictor import ForwardOutput, Predictor
from ..training.distributed import shard_range
from .predict_pipeline import Buckets, Decoded, Gate, decoded_images, single_threaded_torch

__all__ = ["PredictReport", "collect_images", "predict_files", "summary_entry", "image_id_of"]

RECORDS_DIR = ".predict"
OVERLAY_FORMATS = ("png", "jpg")
_GLOB_CHARS = set("*?[")


@dataclass
class PredictReport:
    """What a ``predict_files`` run did; ``errors`` holds ``(file or pattern, one-line message)``."""

    out_dir: Path
    predicted: int = 0
    resumed: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)
    #: With ``shard``: the part's input files in order, the records of those finished, the classes and the number
    #: of input files of all parts (what ``predict_shards`` writes into the part's manifest).
    shard_files: list[Path] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    label_space: LabelSpace | None = None
    num_inputs: int = 0
    precision: str = "fp32"  # what ran: an ONNX model's own precision (fp32, int8), else the one asked for

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0


def collect_images(inputs: Sequence[str | Path], recursive: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files from ``inputs``: a file is taken as it is (a missing one becomes that file's error when read), a folder
    gives its files (sorted; with ``recursive``, those of its subfolders too), a pattern with ``* ? [`` gives its
    matches (sorted; ``**`` crosses folders). Hidden files (``.name``) are skipped in folders, as globs skip them.
    Returns the files in order without duplicates, and ``(pattern, message)`` for patterns matching nothing."""
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def take(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for found in _folder_files(path, recursive):
                take(found)
        elif not path.exists() and _GLOB_CHARS & set(str(item)):
            matches = sorted(glob.glob(str(item), recursive=True))
            if not matches:
                errors.append((str(item), "no file matches this pattern"))
            for match in matches:
                match_path = Path(match)
                if match_path.is_dir():
                    for found in _folder_files(match_path, recursive):
                        take(found)
                else:
                    take(match_path)
        else:
            take(path)
    return files, errors


def _folder_files(folder: Path, recursive: bool) -> list[Path]:
    walk = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in walk:
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative) or not path.is_file():
            continue
        found.append(path)
    return sorted(found)


def predict_files(
    images: Sequence[str | Path], checkpoint: str | None = None, onnx: str | None = None, task: str = "panoptic",
    out_dir: str | Path = "predictions", device: str = "cpu", min_size: int | None = None,
    max_size: int | None = None, precision: str = "fp32", coco_json: str | Path | None = None,
    recursive: bool = False, batch_size: int = 4, workers: int | None = None, overlays: bool = True,
    overwrite: bool = False, progress: bool | None = None, model: Any = None, overlay_format: str = "png",
    shard: tuple[int, int] | None = None, runtime: str | None = None,
) -> PredictReport:
    """Segment ``images`` (files, folders, glob patterns) and write into ``out_dir`` per image
    ``<stem>_<task>.png`` (overlay, unless ``overlays=False``; ``.jpg`` with ``overlay_format="jpg"``), the standard results files of ``task`` (see
    ``evaluation.results_files``) and ``summary.json`` (class names, scores, areas, and the errors). Image ids are
    the file stem (an int when numeric, as COCO names its files) or come from ``coco_json``.

    ``batch_size`` images of the same padded size go through the model together; ``workers`` threads decode and
    write (default: up to 4). ``progress``: a progress bar on stderr (None: when stderr is a terminal). ``model``:
    an already loaded model instead of ``checkpoint`` / ``onnx``. When no input can be read, the error says so and
    nothing is written. ``onnx``: an exported file run on ``runtime`` (onnxruntime or openvino; None: OpenVINO for
    ``.xml``, onnxruntime otherwise) at ``precision`` (see ``inference.runtimes``).

    ``shard=(i, n)``: predict only part ``i`` of ``n`` of the input files (``apps.predict_shards``, which writes the
    results files once all parts are done); the report then holds the part's files and records, and no results
    files are written here."""
    if overlay_format not in OVERLAY_FORMATS:
        raise ValueError(f"--overlay-format must be one of {', '.join(OVERLAY_FORMATS)}, got {overlay_format!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if model is None:
        if onnx is not None:
            from ..inference.runtimes import load_exported

            model = load_exported(onnx, runtime, precision)
        elif checkpoint is not None:
            model = checkpoint
        else:
            raise ValueError("give --checkpoint or --onnx")
    paths, errors = collect_images(images, recursive)
    if not paths:
        where = errors[0][0] if errors else ", ".join(str(i) for i in images)
        raise ValueError(f"no image files found in {where}")
    image_ids = _coco_image_ids(coco_json) if coco_json else None
    ids = [_image_id(path, image_ids, coco_json) for path in paths]
    stems = [path.stem for path in paths]
    _check_unique(paths, stems, "file stem", "their result PNGs would overwrite each other")
    _check_unique(paths, ids, "image id", "image ids must be unique in the results files")

    # An exported model runs at its own precision (set when it was loaded): no autocast around it.
    exported = getattr(model, "runtime", None)
    predictor = Predictor(model, task=task, device=device, min_size=min_size, max_size=max_size,
                          batch_size=batch_size, precision="fp32" if exported else precision)
    label_space = predictor.label_space
    out = Path(out_dir)
    records_dir = out / RECORDS_DIR / task
    source = onnx or checkpoint
    # An exported model runs at its own precision (an int8 file is int8; bf16 where the runtime has it).
    ran = str(model.precision) if exported else precision
    signature = {"model": str(Path(source).resolve()) if source else type(model).__name__, "precision": ran,
                 "min_size": min_size, "max_size": max_size, "coco_json": str(coco_json) if coco_json else None}
    if exported:
        signature["runtime"] = exported
    _check_records(records_dir, signature, overwrite)
    selected = range(len(paths)) if shard is None else shard_range(len(paths), *shard)
    report = PredictReport(out_dir=out, errors=errors if shard is None or shard[0] == 0 else [], precision=ran)
    started_records = False

    # Resume: an image is done when its record and every output file it names exist.
    records: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for index in selected:
        stem = stems[index]
        record = None if overwrite else _load_record(records_dir / f"{stem}.json", out, task, paths[index],
                                                     overlay_format if overlays else None)
        if record is not None and record["summary"]["image_id"] == ids[index]:
            record["summary"]["file_name"] = str(paths[index])  # as this run names it
            records[index] = record
        else:
            todo.append(index)
    report.resumed = len(records)

    def finish(item: Decoded, forwarded: ForwardOutput) -> tuple[int, dict[str, Any]]:
        """Post-process one image and write its outputs (in a worker thread)."""
        result = predictor.postprocess_batch(forwarded, (task,))[0][task]
        return item.index, _write_outputs(out, records_dir, task, label_space, paths[item.index], ids[item.index],
                                          item.image, result, overlay_format if overlays else None)

    gate = Gate(enabled=predictor.device.type == "cpu")
    started = time.perf_counter()
    bar = _progress_bar(len(todo), progress)
    try:
        with ThreadPoolExecutor(workers, "decode", single_threaded_torch) as decoders, \
                ThreadPoolExecutor(workers, "write", single_threaded_torch) as writers:
            writing: deque[Future] = deque()

            def finish_oldest() -> None:
                # A failure to post-process or write is not a per-file error: it stops the run.
                index, record = writing.popleft().result()
                records[index] = record
                report.predicted += 1
                bar.update(1)

            def run_batch(batch: list[Decoded]) -> None:
                nonlocal started_records
                if not started_records:  # the first image read: only now is anything written
                    _start_records(records_dir, signature, overwrite, remove=shard is None)  # parts share it
                    started_records = True
                with gate.closed():
                    forwarded = predictor.forward_batch([item.prepared for item in batch],
                                                        [item.original_size for item in batch])
                writing.extend(writers.submit(gate.after, finish, item, forwarded.image(i))
                               for i, item in enumerate(batch))
                # Bounded: batches wait for at most a few batches of post-processing and writing.
                while len(writing) > (workers + 1) * batch_size:
                    finish_oldest()

            buckets = Buckets(predictor, batch_size, run_batch)
            for item in decoded_images(todo, paths, predictor, decoders, gate, prefetch=2 * batch_size + 2 * workers):
                if item.error is not None:
                    report.errors.append((str(paths[item.index]), item.error))
                    bar.update(1)
                else:
                    buckets.add(item)
            buckets.flush()
            while writing:
                finish_oldest()
    finally:
        bar.close()
    report.seconds = time.perf_counter() - started
    if shard is not None:
        report.shard_files = [paths[i] for i in selected]
        report.records = [records[i] for i in sorted(records)]
        report.label_space, report.num_inputs = label_space, len(paths)
        return report
    if not records and report.errors:
        name, message = report.errors[0]
        more = f" ({len(report.errors) - 1} more failed)" if len(report.errors) > 1 else ""
        raise ValueError(f"no input could be read, nothing written: {name}: {message}{more}")
    report.files = _write_results(out, task, label_space, ran, [records[i] for i in sorted(records)],
                                  report.errors)
    return report


def save_overlay(overlay: Any, path: Path) -> None:
    """Write an overlay as PNG or JPEG (by the suffix)."""
    if path.suffix == ".jpg":
        # Quality 90 keeps label text and segment outlines clean; 4:4:4 chroma keeps the thin coloured outlines.
        overlay.save(path, format="JPEG", quality=90, subsampling=0)
    else:
        # PNG level 1: the same pixels, ~3x faster to encode than the default level 6, a few % larger.
        overlay.save(path, format="PNG", compress_level=1)


def _source_key(path: Path) -> list[Any]:
    """What a record was made from: a changed or different file with the same stem is predicted again."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _write_outputs(out: Path, records_dir: Path, task: str, label_space: LabelSpace, path: Path, image_id: Any,
                   image: Tensor, result: Any, overlay_format: str | None) -> dict[str, Any]:
    """One image's overlay (``overlay_format`` png / jpg, None: none), result PNGs and record (last, so that a
    record means the image is done)."""
    stem = path.stem
    outputs = []
    if overlay_format is not None:
        name = f"{stem}_{task}.{overlay_format}"
        save_overlay(visualize(image, result, task, label_space), out / name)
        outputs.append(name)
    added = ResultsWriter(out, label_space, (task,)).add(image_id, stem, {task: result})
    if task in ("panoptic", "semantic"):
        outputs.append(f"{task}/{stem}.png")
    summary = summary_entry(task, label_space, str(path), image_id, image, result)
    record = {"source": _source_key(path), "outputs": outputs, "summary": summary, "results": added.get(task)}
    _atomic_write(records_dir / f"{stem}.json", dumps(record))
    return record


def summary_entry(task: str, label_space: LabelSpace, file_name: str, image_id: Any, image: Tensor,
                  result: Any) -> dict[str, Any]:
    """One image's entry of ``summary.json`` (``serve`` answers the same entry for an upload)."""
    summary: dict[str, Any] = {"file_name": file_name, "image_id": image_id, "height": int(image.shape[1]),
                               "width": int(image.shape[2])}
    if task == "semantic":
        summary["classes"] = sorted({label_space.names[i] for i in result.unique().tolist()})
    elif task == "panoptic":
        summary["segments"] = [
            {**_plain(info), "category_id": label_space.to_dataset(int(info["category_id"])),
             "category": label_space.names[int(info["category_id"])]}
            for info in result[1]
        ]
    else:
        summary["instances"] = [
            {"category_id": label_space.to_dataset(int(label)), "category": label_space.names[int(label)],
             "score": float(score), "bbox_xyxy": [float(v) for v in box]}
            for label, score, box in zip(result["labels"], result["scores"], result["boxes"])
        ]
    return summary


def _load_record(path: Path, out: Path, task: str, source: Path, overlays: str | None) -> dict[str, Any] | None:
    """The record of a finished image, or None when it has to be predicted (again)."""
    try:
        record = json.loads(path.read_text())
        if record["source"] != _source_key(source):
            return None
        wanted = list(record["outputs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if overlays:
        wanted.append(f"{source.stem}_{task}.{overlays}")
    return record if all((out / name).is_file() for name in wanted) else None


def _check_records(records_dir: Path, signature: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix results of different models or settings in one folder (``overwrite`` starts afresh)."""
    run_file = records_dir / "run.json"
    if not overwrite and run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except ValueError:
            previous = {}
        changed = [key for key in signature if previous.get(key) != signature[key]]
        if changed:
            key = changed[0]
            raise ValueError(f"{records_dir.parent.parent} holds {records_dir.name} predictions made with "
                             f"{key}={previous.get(key)!r}, not {signature[key]!r}; pass --overwrite to redo them "
                             f"or choose another --out")


def _start_records(records_dir: Path, signature: dict[str, Any], overwrite: bool, remove: bool = True) -> None:
    """The records folder of this run (emptied first with ``overwrite``, unless ``remove=False``: parts of a run
    share it), once there is something to record."""
    if overwrite and remove and records_dir.exists():
        shutil.rmtree(records_dir)
    records_dir.mkdir(parents=True, exist_ok=True)
    run_file = records_dir / "run.json"
    _atomic_write(run_file, dumps(signature))


def _write_results(out: Path, task: str, label_space: LabelSpace, precision: str, records: list[dict[str, Any]],
                   errors: list[tuple[str, str]]) -> list[Path]:
    """The results JSON of ``task`` and ``summary.json``, from the records of every finished input image."""
    files = []
    if task == "panoptic":
        document: Any = {"annotations": [record["results"] for record in records],
                         "categories": label_space.to_coco_categories()}
    elif task == "instance":
        document = [entry for record in records for entry in record["results"]]
    else:
        document = None
    if document is not None:
        files.append(_atomic_write(out / RESULT_FILES[task], dumps(document)))
    files.append(_atomic_write(out / "summary.json", dumps(
        {"task": task, "precision": precision, "images": [record["summary"] for record in records],
         "errors": [{"file": name, "error": message} for name, message in errors]}, indent=1)))
    return files


def _atomic_write(path: Path, text: str) -> Path:
    """Write via a temporary file and a rename, so that an interrupted run never leaves half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def _progress_bar(total: int, progress: bool | None):
    from tqdm import tqdm

    disable = not (os.isatty(2) if progress is None else progress)
    return tqdm(total=total, unit="img", desc="predict", disable=disable, dynamic_ncols=True)


def _check_unique(paths: list[Path], keys: list[Any], what: str, why: str) -> None:
    first: dict[Any, Path] = {}
    for path, key in zip(paths, keys):
        if key in first:
            raise ValueError(f"{first[key]} and {path} have the same {what} {key!r}: {why}")
        first[key] = path


def _coco_image_ids(coco_json: str | Path) -> dict[str, Any]:
    """``file name -> image id`` from a COCO JSON's ``images`` (basenames, as a user passes image files)."""
    from ..data.formats.coco import load_coco_json

    data = load_coco_json(Path(coco_json))
    return {Path(image["file_name"]).name: image["id"] for image in data.get("images", [])}


def _image_id(path: Path, image_ids: dict[str, Any] | None, coco_json: Any) -> Any:
    if image_ids is not None:
        if path.name not in image_ids:
            raise ValueError(f"{coco_json}: no image with file name {path.name!r} (for {path})")
        return image_ids[path.name]
    return image_id_of(path)


def image_id_of(path: Path) -> Any:
    """The image id of a file without a COCO JSON: its stem, an int when numeric (as COCO names its files)."""
    return int(path.stem) if path.stem.isdigit() else path.stem


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}
