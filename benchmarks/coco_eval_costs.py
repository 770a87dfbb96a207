"""The CPU side of evaluating one COCO val image, per image, on this machine: what each process of a sharded
``evaluate`` spends besides its model forward, and what rank 0 spends alone after the gather. Inputs at COCO's
shapes: 133 classes (80 things), 100 queries, the forward at 800x1088 (800x1067 padded to 32), results at the
original 480x640; model outputs with ~15 confident blob-shaped queries, ground truth with ~11 segments (COCO
panoptic val averages 11).

Timed per image (medians over ``--num-images``): post-processing of the three tasks (on the CPU; on a GPU it runs
on the GPU), PQ / AP / mIoU updates (the AP update RLE-encodes 100 masks), the pickled size of the evaluators that
``gather_object`` sends, and rank 0's merge + ``compute()`` (COCOeval over all images) per image.

    python benchmarks/coco_eval_costs.py [--num-images 50] [--threads 1] [--device cpu|cuda]

Writes ``benchmarks/results/coco_eval_costs.json`` (``coco_eval_costs_<device>.json`` for another device) and
prints the projection of docs/distributed.md: the time to evaluate COCO val (5,000 images) on 1 and on 8 GPUs from
these costs and the measured H200 forward rates in ``results/gpu_h200.json`` (batch 1, fp32, 1024x1024 images).
Post-processing is counted only when measured on a GPU (``--device cuda``): on a CPU it costs what it costs there.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from mask2former.evaluation.instance import InstanceEvaluator
from mask2former.evaluation.panoptic import PanopticEvaluator
from mask2former.evaluation.semantic import SemanticEvaluator
from mask2former.inference.postprocess import batch_postprocess
from mask2former.inference.predictor import _to_cpu  # the same device-to-CPU copy as the Predictor

RESULTS = Path(__file__).resolve().parent / "results" / "coco_eval_costs.json"
CLASSES, THINGS, QUERIES = 133, 80, 100
RUN_SIZE, PADDED, ORIGINAL = (800, 1067), (800, 1088), (480, 640)


def blobs(generator: torch.Generator, count: int, size: tuple[int, int], scale: int = 8) -> torch.Tensor:
    """``count`` smooth random fields (blob-shaped regions where positive)."""
    low = torch.randn(count, 1, size[0] // scale + 1, size[1] // scale + 1, generator=generator)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)[:, 0] * 4


def model_outputs(generator: torch.Generator):
    logits = torch.randn(1, QUERIES, CLASSES + 1, generator=generator)
    logits[0, :, CLASSES] = 3.0  # most queries: no object
    confident = torch.randperm(QUERIES, generator=generator)[:15]
    logits[0, confident, torch.randint(0, CLASSES, (15,), generator=generator)] = 8.0
    masks = blobs(generator, QUERIES, (PADDED[0] // 4, PADDED[1] // 4))[None]
    return types.SimpleNamespace(pred_logits=logits, pred_masks=masks)


def ground_truth(generator: torch.Generator) -> dict:
    """A sample dict: ~11 disjoint segments (things and stuff) from the arg-max of random fields, some void."""
    fields = blobs(generator, 11, ORIGINAL, scale=32)
    owner = fields.argmax(0)
    void = fields.max(0).values < -1.0
    labels = torch.cat([torch.randint(0, THINGS, (6,), generator=generator),
                        torch.randperm(CLASSES - THINGS, generator=generator)[:5] + THINGS])
    masks = torch.stack([(owner == k) & ~void for k in range(11)])
    semantic = torch.full(ORIGINAL, 255, dtype=torch.int64)
    for label, mask in zip(labels, masks):
        semantic[mask] = label
    return {"labels": labels, "masks": masks, "iscrowd": torch.zeros(11, dtype=torch.bool), "semantic": semantic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (per process of a sharded run)")
    parser.add_argument("--device", default="cpu", help="where post-processing runs (the model's device)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    is_thing = torch.tensor([c < THINGS for c in range(CLASSES)])
    names = [f"c{c}" for c in range(CLASSES)]
    panoptic, instance = PanopticEvaluator(is_thing, names), InstanceEvaluator(names, is_thing)
    semantic = SemanticEvaluator(CLASSES, 255, names)
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"postprocess": [], "pq_update": [], "ap_update": [], "miou_update": []}
    options = dict(padded_size=PADDED, object_mask_threshold=0.8, overlap_threshold=0.8, top_k=100,
                   semantic_postprocess_before_inference=True)
    for index in range(args.num_images):
        outputs, sample = model_outputs(generator), ground_truth(generator)
        outputs.pred_logits, outputs.pred_masks = outputs.pred_logits.to(device), outputs.pred_masks.to(device)
        sample["image_id"] = index
        _sync(device)
        start = time.perf_counter()
        results = {task: _to_cpu(batch_postprocess(outputs, [RUN_SIZE], [ORIGINAL], task, is_thing.to(device),
                                                   **options)[0])
                   for task in ("panoptic", "instance", "semantic")}
        times["postprocess"].append(time.perf_counter() - start)
        start = time.perf_counter()
        panoptic.update_from_sample(results["panoptic"], sample)
        times["pq_update"].append(time.perf_counter() - start)
        things = is_thing[sample["labels"]]
        start = time.perf_counter()
        instance.update(results["instance"], {"labels": sample["labels"][things], "masks": sample["masks"][things],
                                              "iscrowd": sample["iscrowd"][things], "image_id": index})
        times["ap_update"].append(time.perf_counter() - start)
        start = time.perf_counter()
        semantic.update(results["semantic"], sample["semantic"])
        times["miou_update"].append(time.perf_counter() - start)
    # What gather_object does with them: pickle on each rank, unpickle on rank 0; then rank 0 merges and computes.
    start = time.perf_counter()
    payload = pickle.dumps({"panoptic": panoptic, "instance": instance, "semantic": semantic})
    gathered = pickle.loads(payload)
    serialise = time.perf_counter() - start
    start = time.perf_counter()
    empty = {"panoptic": PanopticEvaluator(is_thing, names), "instance": InstanceEvaluator(names, is_thing),
             "semantic": SemanticEvaluator(CLASSES, 255, names)}
    for task, evaluator in empty.items():
        evaluator.merge(gathered[task])
    empty["panoptic"].compute(), empty["semantic"].compute()
    ap = empty["instance"].compute()
    rank0 = time.perf_counter() - start
    per_image = {key: statistics.median(values) for key, values in times.items()}
    result = {
        "command": f"python benchmarks/coco_eval_costs.py --num-images {args.num_images} --threads {args.threads}",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "load_average": os.getloadavg()[0], "num_images": args.num_images,
        "detections_per_image": len(instance.detections) / args.num_images,
        "seconds_per_image": {key: round(value, 5) for key, value in per_image.items()},
        "cpu_seconds_per_image_per_process": round(sum(per_image.values()), 5),
        "device": str(device),
        "gather_bytes_per_image": round(len(payload) / args.num_images),
        "gather_pickle_unpickle_seconds_per_image": round(serialise / args.num_images, 5),
        "rank0_merge_and_compute_seconds_per_image": round(rank0 / args.num_images, 5),
        "AP_of_the_random_detections": ap["AP"],  # only that COCOeval ran
    }
    result["projection"] = project(result)
    path = RESULTS if device.type == "cpu" else RESULTS.with_name(f"coco_eval_costs_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def project(costs: dict, num_images: int = 5000, gpus: tuple[int, ...] = (1, 8)) -> dict:
    """PROJECTED seconds to evaluate ``num_images`` on ``gpus`` GPUs: every rank runs ceil(N / gpus) images at
    (measured forward + measured per-image CPU work), then rank 0 alone unpickles and merges all N images and
    computes the metrics (measured per image, times N). Start-up and data loading are left out (the same for any
    number of GPUs when the loader keeps up)."""
    gpu = json.loads((RESULTS.parent / "gpu_h200.json").read_text())
    per_image_cpu = sum(value for key, value in costs["seconds_per_image"].items()
                        if key != "postprocess" or costs["device"] != "cpu")
    serial = num_images * (costs["rank0_merge_and_compute_seconds_per_image"]
                           + costs["gather_pickle_unpickle_seconds_per_image"])
    out = {"num_images": num_images, "per_image_cpu_seconds_counted": round(per_image_cpu, 4),
           "rank0_serial_seconds": round(serial, 1), "postprocess_counted": costs["device"] != "cpu"}
    for name, model in gpu["end_to_end"].items():
        run = next(r for r in model["runs"] if r["batch"] == 1 and r["precision"] == "fp32")
        forward = 1.0 / run["ours_images_per_s"]
        seconds = {n: -(-num_images // n) * (forward + per_image_cpu) + serial for n in gpus}
        out[name] = {"forward_seconds_per_image_h200": round(forward, 4),
                     **{f"seconds_{n}_gpu": round(value, 1) for n, value in seconds.items()},
                     "speedup": round(seconds[gpus[0]] / seconds[gpus[-1]], 2)}
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
