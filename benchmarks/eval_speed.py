"""Speed of our vectorised PQ vs panopticapi's algorithm (the copy in cityscapesscripts) on the same inputs.

Ground truth comes from ``--source``:
- ``synthetic`` (default): stuff regions with wavy boundaries, occluding elliptical things, void borders and
  blobs, an occasional crowd region; 6 thing + 6 stuff classes;
- ``fashion_scenes``: the FashionScenes validation split (``mask2former.data.fashion_scenes``).
Predictions are the ground truth perturbed the way a model errs: segments shifted and grown/shrunk,
some dropped, relabelled or split, spurious segments added, unlabelled speckle.

Ours runs on in-memory tensors (``PanopticEvaluator.update``). The oracle needs COCO panoptic PNG + JSON, so
the cases are written to a temporary folder first (untimed). The oracle is timed twice: reading its PNGs
(as it is used), and with those reads served from already-decoded arrays in memory (its compute on the same
inputs, RGB-to-id conversion included). Both must give the same PQ.

    python benchmarks/eval_speed.py [--source synthetic|fashion_scenes] [--num-images 500] [--image-size 256]
                                    [--device cpu|cuda] [--threads 1]

Results are merged into benchmarks/results/eval_speed.json under ``<source>_<N>x<size>px_<device>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mask2former.data.formats.coco_panoptic import id_to_rgb
from mask2former.evaluation.panoptic import PanopticEvaluator, gt_panoptic_from_sample

RESULTS = Path(__file__).resolve().parent / "results" / "eval_speed.json"


# ------------------------------------------------------------------------------------------- inputs


def synthetic_ground_truth(rng: np.random.Generator, size: int, is_thing: list[bool]):
    """(segment_map int64 [H, W], segments_info) with stuff, things, void and sometimes a crowd segment."""
    thing_classes = [c for c, flag in enumerate(is_thing) if flag]
    stuff_classes = [c for c, flag in enumerate(is_thing) if not flag]
    rows, cols = np.mgrid[0:size, 0:size]
    segment_map = np.zeros((size, size), np.int64)
    segments = []
    # stuff: 2-4 bands with sinusoidal boundaries, one segment per class
    num_stuff = int(rng.integers(2, 5))
    classes = rng.choice(stuff_classes, size=num_stuff, replace=False)
    phase, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(4, size / 10)
    boundary = rows + amplitude * np.sin(cols / size * rng.uniform(2, 8) + phase)
    cuts = np.sort(rng.uniform(0.15, 0.85, size=num_stuff - 1)) * size
    band = np.searchsorted(cuts, boundary)
    for index, category in enumerate(classes):
        segments.append({"id": len(segments) + 1, "category_id": int(category), "iscrowd": 0})
        segment_map[band == index] = segments[-1]["id"]
    # void along the stuff boundaries (annotators leave thin gaps)
    edge = np.zeros((size, size), bool)
    edge[1:] |= band[1:] != band[:-1]
    edge[:, 1:] |= band[:, 1:] != band[:, :-1]
    segment_map[edge] = 0
    # things: 4-14 ellipses, later ones occlude earlier ones
    crowd_done = False
    for _ in range(int(rng.integers(4, 15))):
        center_y, center_x = rng.uniform(0, size, size=2)
        radius_y, radius_x = rng.uniform(size / 40, size / 7, size=2)
        mask = ((rows - center_y) / radius_y) ** 2 + ((cols - center_x) / radius_x) ** 2 <= 1
        if mask.sum() < 4:
            continue
        crowd = not crowd_done and rng.random() < 0.15
        crowd_done |= crowd
        segments.append({"id": len(segments) + 1, "category_id": int(rng.choice(thing_classes)), "iscrowd": int(crowd)})
        segment_map[mask] = segments[-1]["id"]
    # a void blob
    center_y, center_x = rng.uniform(0, size, size=2)
    segment_map[((rows - center_y) ** 2 + (cols - center_x) ** 2) < rng.uniform(0, size / 12) ** 2] = 0
    present = set(np.unique(segment_map).tolist())
    segments = [s for s in segments if s["id"] in present]
    return segment_map, segments


def perturbed_prediction(rng: np.random.Generator, gt_map: np.ndarray, gt_segments, num_classes: int):
    """A plausible post-processed prediction: non-overlapping segments with ids 1..N (0 = void)."""
    size_y, size_x = gt_map.shape
    regions = []
    for info in gt_segments:
        if rng.random() < 0.1:
            continue  # missed
        mask = gt_map == info["id"]
        mask = np.roll(mask, tuple(int(v) for v in rng.integers(-4, 5, size=2)), axis=(0, 1))
        grow = int(rng.integers(-2, 3))
        for _ in range(abs(grow)):  # 4-neighbour dilation / erosion
            shifted = [np.roll(mask, step, axis) for step in (-1, 1) for axis in (0, 1)]
            mask = np.logical_or.reduce([mask, *shifted]) if grow > 0 else np.logical_and.reduce([mask, *shifted])
        category = info["category_id"] if rng.random() > 0.1 else int(rng.integers(0, num_classes))
        if rng.random() < 0.05 and mask.sum() > 20:  # split in two along a vertical line
            column = int(np.median(np.nonzero(mask)[1]))
            left = mask.copy()
            left[:, column:] = False
            regions += [(left, category), (mask & ~left, category)]
        else:
            regions.append((mask, category))
    for _ in range(int(rng.integers(0, 4))):  # spurious detections
        mask = np.zeros_like(gt_map, dtype=bool)
        y, x = int(rng.integers(0, size_y - 8)), int(rng.integers(0, size_x - 8))
        mask[y : y + int(rng.integers(4, size_y // 6)), x : x + int(rng.integers(4, size_x // 6))] = True
        regions.append((mask, int(rng.integers(0, num_classes))))
    pred_map = np.zeros_like(gt_map)
    for index in rng.permutation(len(regions)):
        pred_map[regions[index][0]] = index + 1
    pred_map[rng.random(gt_map.shape) < 0.01] = 0
    present = set(np.unique(pred_map).tolist())
    pred_segments = [{"id": i + 1, "category_id": regions[i][1]} for i in range(len(regions)) if i + 1 in present]
    return pred_map, pred_segments


def build_cases(args):
    rng = np.random.default_rng(args.seed)
    if args.source == "synthetic":
        names = [f"thing{i}" for i in range(6)] + [f"stuff{i}" for i in range(6)]
        is_thing = [True] * 6 + [False] * 6
        ground_truth = [synthetic_ground_truth(rng, args.image_size, is_thing) for _ in range(args.num_images)]
    else:
        from mask2former.data.fashion_scenes import FashionScenes, fashion_scenes_label_space

        label_space = fashion_scenes_label_space()
        names, is_thing = label_space.names, label_space.is_thing
        dataset = FashionScenes("val", num_images=args.num_images, seed=args.seed, image_size=args.image_size)
        ground_truth = []
        for index in range(len(dataset)):
            segment_map, segments = gt_panoptic_from_sample(dataset[index])
            ground_truth.append((segment_map.numpy().astype(np.int64), [s for s in segments]))
    cases = []
    for gt_map, gt_segments in ground_truth:
        for info in gt_segments:
            info["area"] = int((gt_map == info["id"]).sum())
        cases.append((gt_map, gt_segments, *perturbed_prediction(rng, gt_map, gt_segments, len(names))))
    return cases, names, is_thing


# ------------------------------------------------------------------------------------------- runners


def run_ours(cases, names, is_thing, device="cpu"):
    """Maps are moved to ``device`` before timing (as post-processed predictions would already be there)."""
    tensors = [
        (torch.from_numpy(p.astype(np.int32)).to(device), ps, torch.from_numpy(g.astype(np.int32)).to(device), gs)
        for g, gs, p, ps in cases
    ]
    evaluator = PanopticEvaluator(is_thing, names)
    evaluator.update(*tensors[0])  # warm-up (first-call dispatch), not timed
    evaluator.reset()
    start, cpu_start = time.perf_counter(), time.process_time()
    for pred_map, pred_segments, gt_map, gt_segments in tensors:
        evaluator.update(pred_map, pred_segments, gt_map, gt_segments)
    results = evaluator.compute()  # update() reads its counts back to the host, so no extra sync is needed
    return time.perf_counter() - start, time.process_time() - cpu_start, results


def run_oracle(cases, names, is_thing, folder: Path):
    from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as oracle

    (folder / "gt").mkdir()
    (folder / "pred").mkdir()
    pairs = []
    for index, (gt_map, gt_segments, pred_map, pred_segments) in enumerate(cases):
        name = f"{index:05d}.png"
        Image.fromarray(id_to_rgb(gt_map)).save(folder / "gt" / name)
        Image.fromarray(id_to_rgb(pred_map)).save(folder / "pred" / name)
        shift = lambda segments: [{**s, "category_id": s["category_id"] + 1} for s in segments]  # noqa: E731
        pairs.append(({"image_id": index, "file_name": name, "segments_info": shift(gt_segments)},
                      {"image_id": index, "file_name": name, "segments_info": shift(pred_segments)}))
    categories = {c + 1: {"id": c + 1, "name": n, "isthing": int(t)} for c, (n, t) in enumerate(zip(names, is_thing))}
    paths = [str(folder / sub / gt_ann["file_name"]) for gt_ann, _ in pairs for sub in ("gt", "pred")]

    def timed(function):
        start, cpu_start = time.perf_counter(), time.process_time()
        value = function()
        return value, time.perf_counter() - start, time.process_time() - cpu_start

    def evaluate():
        with contextlib.redirect_stdout(io.StringIO()):
            stats = oracle.pq_compute_single_core(0, pairs, str(folder / "gt"), str(folder / "pred"), categories)
            return oracle.average_pq(stats, categories)

    # PNG decoding alone (file cache warmed first), exactly as the oracle reads its inputs
    decoded = {path: np.asarray(Image.open(path)) for path in paths}
    _, decode_wall, decode_cpu = timed(lambda: [oracle.rgb2id(np.array(Image.open(p), dtype=np.uint32)) for p in paths])
    results, wall, cpu = timed(evaluate)
    # the oracle again with its PNG reads served from memory: its compute on the same in-memory inputs
    # (still converting RGB to ids, which its format requires)
    pil_module = oracle.Image
    oracle.Image = types.SimpleNamespace(open=decoded.__getitem__)
    try:
        in_memory, memory_wall, memory_cpu = timed(evaluate)
    finally:
        oracle.Image = pil_module
    assert in_memory == results
    return {"wall": wall, "cpu": cpu, "decode_wall": decode_wall, "decode_cpu": decode_cpu,
            "memory_wall": memory_wall, "memory_cpu": memory_cpu}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("synthetic", "fashion_scenes"), default="synthetic")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where our evaluator runs (the oracle always runs on the CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the oracle is single-threaded)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases, names, is_thing = build_cases(args)
    ours_seconds, ours_cpu, ours = run_ours(cases, names, is_thing, args.device)
    with tempfile.TemporaryDirectory() as folder:
        oracle_time, expected = run_oracle(cases, names, is_thing, Path(folder))
    max_difference = max(
        abs(ours[group][key.upper()] - expected[group][key]) for group in ("All", "Things", "Stuff") for key in ("pq", "sq", "rq")
    )
    record = {
        "source": args.source,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device),
        "num_images": len(cases),
        "image_size": args.image_size,
        "segments_per_image": {
            "gt": round(float(np.mean([len(c[1]) for c in cases])), 2),
            "pred": round(float(np.mean([len(c[3]) for c in cases])), 2),
        },
        "ours_seconds": round(ours_seconds, 4),
        "ours_cpu_seconds": round(ours_cpu, 4),
        "oracle_seconds": round(oracle_time["wall"], 4),
        "oracle_cpu_seconds": round(oracle_time["cpu"], 4),
        "oracle_png_decode_seconds": round(oracle_time["decode_wall"], 4),
        "oracle_in_memory_seconds": round(oracle_time["memory_wall"], 4),
        "oracle_in_memory_cpu_seconds": round(oracle_time["memory_cpu"], 4),
        # ratios > 1 mean ours is faster; "in_memory" serves the oracle's PNG reads from memory
        "speedup_vs_oracle_from_png": round(oracle_time["wall"] / ours_seconds, 2),
        "speedup_vs_oracle_in_memory": round(oracle_time["memory_wall"] / ours_seconds, 2),
        "speedup_vs_oracle_in_memory_cpu_time": round(oracle_time["memory_cpu"] / ours_cpu, 2),
        "PQ": round(100 * ours["All"]["PQ"], 3),
        "PQ_th": round(100 * ours["Things"]["PQ"], 3),
        "PQ_st": round(100 * ours["Stuff"]["PQ"], 3),
        "max_abs_difference_vs_oracle": max_difference,
        "oracle": "cityscapesscripts.evaluation.evalPanopticSemanticLabeling.pq_compute_single_core (panopticapi port), 1 process",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(record, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(args.output.read_text()) if args.output.exists() else {}
    merged[f"{args.source}_{len(cases)}x{args.image_size}px_{args.device.split(':')[0]}"] = record
    args.output.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
