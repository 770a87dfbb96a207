"""Throughput of ``mask2former predict`` over a folder vs the bare model forward at the same batch size.

The folder: ``--num-images`` FashionScenes val images as ``mask2former data export fashion-scenes OUT --format
coco-panoptic --split val`` writes them (``OUT/val/*.png``), one of them truncated to half its bytes (a corrupt file:
it must be reported and skipped, the others predicted).

- bare: ``model(images)`` on the decodable images, decoded, padded, normalised and batched before timing
  (``--batch-size`` per forward, one size in a batch, as predict batches them);
- predict: ``predict_files`` on the folder, timed around the whole call with the model already loaded: listing,
  decoding (worker threads), batching, forward, post-processing, the results files (panoptic PNGs / RLE),
  summary.json and the resume records; ``predict`` with overlays (the default) and with ``--no-overlays``;
  ``--overlay-format jpg`` times JPEG overlays instead of PNG ones, ``both`` times both (one more side).

The sides run in one process with ``--threads`` intra-op threads, interleaved: per ``--chunk`` images the three
run back to back (rotating order), ``--rounds`` passes over the folder; the ratio is the median of the per-chunk
ratios (robust to load from other processes), images/s the totals, plus process CPU ms per image. Then the whole
folder (with the corrupt file) once per predict side. A per-image breakdown of the pipeline's own costs (stages run
one after another, no overlap, on ``--breakdown-images`` images) says where the rest goes.

    python benchmarks/predict_throughput.py --checkpoint runs/fashion_scenes/model_final [--num-images 500]
        [--batch-size 4] [--threads 2] [--rounds 2] [--task panoptic] [--overlay-format png|jpg|both]

Results are merged into benchmarks/results/predict_throughput.json under ``<task>_<N>img_b<B>_t<threads>_<device>``
(plus ``_jpg`` / ``_png+jpg`` for the other overlay formats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mask2former.data.collate import pad_images
from mask2former.data.export import export_fashion_scenes
from mask2former.data.image_io import read_image
from mask2former.evaluation.results_files import ResultsWriter
from mask2former.apps.predict_files import predict_files, save_overlay
from mask2former.inference.predictor import Predictor
from mask2former.modeling.model import Mask2Former
from mask2former.viz import visualize

RESULTS = Path(__file__).resolve().parent / "results" / "predict_throughput.json"


def make_folder(root: Path, num_images: int) -> tuple[Path, Path]:
    export_fashion_scenes(root, format="coco-panoptic", split="val", num_images=num_images)
    folder = root / "val"
    files = sorted(folder.iterdir())
    corrupt = files[len(files) // 2]
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    return folder, corrupt


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(model: Mask2Former, batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds for one pass of ``model(images)`` over the prepared batches."""
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(batch, aux_outputs=False)
    sync(device)
    return time.perf_counter() - start


def breakdown(model: Mask2Former, files: list[Path], task: str, batch_size: int, device: torch.device,
              out: Path, formats: list[str]) -> dict[str, float]:
    """Milliseconds per image of each stage, run one after another in this thread (no overlap)."""
    predictor = Predictor(model, task=task, device=device, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    label_space = predictor.label_space
    times = {"decode": 0.0, "forward": 0.0, "Predictor.forward_batch (pad, normalise, forward)": 0.0,
             "Predictor.postprocess_batch": 0.0, "overlay drawing": 0.0,
             **{f"overlay {name} encoding": 0.0 for name in formats}, "results files (PNG / RLE)": 0.0}
    count = 0
    for start in range(0, len(files) - batch_size + 1, batch_size):
        chunk = files[start : start + batch_size]
        tic = time.perf_counter()
        images = [read_image(path) for path in chunk]
        times["decode"] += time.perf_counter() - tic
        batch, mask, _ = pad_images(images, model.config.size_divisibility)
        batch = model.normalize(batch.to(device), mask.to(device))
        sync(device)
        tic = time.perf_counter()
        with torch.inference_mode():
            model(batch, aux_outputs=False)
        sync(device)
        times["forward"] += time.perf_counter() - tic
        tic = time.perf_counter()
        forwarded = predictor.forward_batch(images, [tuple(image.shape[-2:]) for image in images])
        sync(device)
        times["Predictor.forward_batch (pad, normalise, forward)"] += time.perf_counter() - tic
        tic = time.perf_counter()
        results = [result[task] for result in predictor.postprocess_batch(forwarded, (task,))]
        times["Predictor.postprocess_batch"] += time.perf_counter() - tic
        for path, image, result in zip(chunk, images, results):
            tic = time.perf_counter()
            drawn = visualize(image, result, task, label_space)
            times["overlay drawing"] += time.perf_counter() - tic
            for name in formats:
                tic = time.perf_counter()
                save_overlay(drawn, out / f"{path.stem}.{name}")
                times[f"overlay {name} encoding"] += time.perf_counter() - tic
            tic = time.perf_counter()
            ResultsWriter(out, label_space, (task,)).add(path.stem, path.stem, {task: result})
            times["results files (PNG / RLE)"] += time.perf_counter() - tic
        count += len(chunk)
    return {name: 1000 * value / count for name, value in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task", default="panoptic", choices=["panoptic", "instance", "semantic"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--breakdown-images", type=int, default=40)
    parser.add_argument("--chunk", type=int, default=100, help="images per interleaved measurement")
    parser.add_argument("--overlay-format", default="png", choices=["png", "jpg", "both"],
                        help="the overlays predict writes (both: a side for each)")
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = Mask2Former.from_pretrained(args.checkpoint).eval().to(device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, corrupt = make_folder(tmp / "data", args.num_images)
        files = sorted(path for path in folder.iterdir() if path != corrupt)
        images = [read_image(path) for path in files]
        sizes = {tuple(image.shape[-2:]) for image in images}
        assert len(sizes) == 1, f"expected one image size, got {sizes}"  # then bare batches = predict's batches
        batches = []
        for start in range(0, len(images), args.batch_size):
            batch, mask, _ = pad_images(images[start : start + args.batch_size], model.config.size_divisibility)
            batches.append(model.normalize(batch.to(device), mask.to(device)))
        del images

        # warm-up (allocator, kernels, thread pools)
        bare_forward(model, batches[:2], device)
        predict_files([files[0]], model=model, task=args.task, out_dir=tmp / "warm", device=args.device,
                      batch_size=args.batch_size, progress=False)

        # Paired, interleaved: per chunk of files the three sides run back to back (rotating order), so that
        # load from other processes hits them alike; the ratio is the median of the per-chunk ratios.
        formats = ["png", "jpg"] if args.overlay_format == "both" else [args.overlay_format]
        overlay_side = {f"predict --overlay-format {name}": name for name in formats}
        names = ["bare forward", "predict --no-overlays", *overlay_side]
        seconds: dict[str, list[float]] = {name: [] for name in names}
        cpu_seconds: dict[str, float] = {name: 0.0 for name in names}
        chunk_ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
        per_batch = args.chunk // args.batch_size
        chunk_count = 0
        for _ in range(args.rounds):
            for first in range(0, len(batches), per_batch):
                chunk_batches = batches[first : first + per_batch]
                chunk_files = files[first * args.batch_size : (first + per_batch) * args.batch_size]
                timings = {}
                order = names[chunk_count % len(names):] + names[: chunk_count % len(names)]
                chunk_count += 1
                for name in order:
                    cpu, tic = process_cpu(), time.perf_counter()
                    if name == "bare forward":
                        bare_forward(model, chunk_batches, device)
                    else:
                        report = predict_files(chunk_files, model=model, task=args.task, out_dir=tmp / "chunks",
                                               device=args.device, batch_size=args.batch_size,
                                               overlays=name in overlay_side,
                                               overlay_format=overlay_side.get(name, "png"), overwrite=True,
                                               progress=False)
                        assert report.predicted == len(chunk_files) and not report.errors, report
                    timings[name] = time.perf_counter() - tic
                    cpu_seconds[name] += process_cpu() - cpu
                    seconds[name].append(timings[name])
                for name in names[1:]:
                    chunk_ratios[name].append(timings["bare forward"] / timings[name])
        # The whole folder once per side: the corrupt file is reported (named) and skipped, every other image
        # predicted.
        folder_rates = {}
        for name in names[1:]:
            tic = time.perf_counter()
            report = predict_files([folder], model=model, task=args.task, out_dir=tmp / "folder", device=args.device,
                                   batch_size=args.batch_size, overlays=name in overlay_side,
                                   overlay_format=overlay_side.get(name, "png"), overwrite=True, progress=False)
            folder_rates[name] = len(files) / (time.perf_counter() - tic)
            assert [Path(path).name for path, _ in report.errors] == [corrupt.name], report.errors
            assert report.predicted == len(files), (report.predicted, len(files))
        errors = report.errors
        stages = breakdown(model, files[: args.breakdown_images], args.task, args.batch_size, device, tmp / "bd",
                           formats)

    count = len(files)
    total = args.rounds * count
    rates = {name: total / sum(values) for name, values in seconds.items()}
    ratios = {name: statistics.median(values) for name, values in chunk_ratios.items()}
    entry = {
        "images": count, "corrupt_file_reported": f"{errors[0][0]}: {errors[0][1]}",
        "batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds, "chunk": args.chunk,
        "overlay_formats": formats,
        "device": args.device,
        "images_per_second": {k: round(v, 3) for k, v in rates.items()},
        "median_chunk_ratio_to_bare": {k: round(v, 4) for k, v in ratios.items()},
        "chunk_ratios": {k: [round(r, 4) for r in v] for k, v in chunk_ratios.items()},
        "cpu_ms_per_image": {k: round(1000 * v / total, 2) for k, v in cpu_seconds.items()},
        "folder_run_images_per_second": {k: round(v, 3) for k, v in folder_rates.items()},
        "breakdown_ms_per_image": {k: round(v, 2) for k, v in stages.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "torch": torch.__version__,
    }
    key = f"{args.task}_{count + 1}img_b{args.batch_size}_t{args.threads}_{args.device}"
    if formats != ["png"]:
        key += "_" + "+".join(formats)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{count + 1} files ({count} images + 1 corrupt), {args.task}, batch {args.batch_size}, "
          f"{args.threads} threads, {args.rounds} rounds of chunks of {args.chunk} images, sides interleaved")
    for name, rate in rates.items():
        ratio = f"median chunk ratio {ratios[name]:.3f} x bare" if name in ratios else "the reference"
        print(f"  {name:24s} {rate:7.2f} images/s  {1000 * cpu_seconds[name] / total:7.1f} ms CPU/image  ({ratio})")
    for name, rate in folder_rates.items():
        print(f"  whole folder, {name:24s} {rate:7.2f} images/s")
    print(f"  corrupt file: {entry['corrupt_file_reported']}")
    print("  breakdown (ms/image, stages run one after another):")
    for name, value in stages.items():
        print(f"    {name:40s} {value:8.2f}")
    print(f"written to {RESULTS} [{key}]")


if __name__ == "__main__":
    main()
