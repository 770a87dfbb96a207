"""One training iteration, ours vs transformers' ``Mask2FormerForUniversalSegmentation``, same model and batch.

Model: Swin-T Mask2Former (embed 96, depths 2,2,6,2, heads 3,6,12,24, window 7, drop path 0.3; 100 queries, 133
classes, 9 decoder layers + the initial prediction, deep supervision), built in transformers with the random
unit-scale weights of ``forward_vs_transformers.py``, saved with ``save_pretrained`` and loaded into ours with
``Mask2Former.from_pretrained``. Batch: ``--batch`` random RGB images of ``--size``^2 with 6 random-rectangle segments
each (random classes). Loss: both at their defaults, which are the same recipe (12544 importance-sampled points,
oversample 3, importance 0.75; weights CE 2 / mask 5 / dice 5, no-object 0.1).

One iteration = forward + loss + backward + full-model gradient clip 0.01 + AdamW step:
- ours: ``Trainer.train_step`` itself (normalise + padding mask, crowd filter, criterion, backward, our clip, AdamW
  over our 4 (lr, weight-decay) groups, lr schedule step);
- transformers: ``model(pixel_values, mask_labels, class_labels).loss``, backward,
  ``torch.nn.utils.clip_grad_norm_``, ``torch.optim.AdamW`` over all parameters.
Variants are interleaved in one process (ours fp32, theirs fp32, ours bf16[, theirs bf16][, fp16 on CUDA]) and the
median of ``--repeats`` runs after ``--warmup`` is reported; bf16/fp16 = autocast (fp32 weights).

    python benchmarks/train_step.py [--threads 2] [--size 256] [--batch 2] [--repeats 5] [--device cpu]

Writes benchmarks/results/train_step.json (``train_step_cuda.json`` for ``--device cuda``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # random_inputs.py: the tests' random targets

from forward_vs_transformers import build_transformers_model  # noqa: E402  (same weights as the forward benchmark)
from machine import machine_info  # noqa: E402

NUM_SEGMENTS = 6


def make_batch(batch: int, size: int, num_classes: int, seed: int = 1) -> dict:
    """A collated batch (``data.contracts.Batch``) of random images with rectangle segments."""
    from random_inputs import random_targets

    from mask2former.data.collate import collate

    generator = torch.Generator().manual_seed(seed)
    samples = []
    targets = random_targets([NUM_SEGMENTS] * batch, num_classes, size=size, seed=seed)
    for index, target in enumerate(targets):
        image = torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)
        labels, masks = target["labels"], target["masks"]
        semantic = torch.full((size, size), 255, dtype=torch.int64)
        for label, mask in zip(labels, masks):
            semantic[mask] = label
        samples.append({"image": image, "labels": labels, "masks": masks,
                        "iscrowd": torch.zeros(NUM_SEGMENTS, dtype=torch.bool), "semantic": semantic,
                        "image_id": index, "file_name": "", "orig_size": (size, size)})
    return collate(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc malloc at its defaults (the CLI tunes it; see mask2former.allocator)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=133)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--transformers-bf16", action="store_true", help="also time transformers under bf16 autocast")
    parser.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                        help="time our bf16 step (auto: where bf16 is native; emulated bf16 is ~100x slower)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="also print the top operators of each fp32 step")
    args = parser.parse_args()
    output = args.output or HERE / "results" / ("train_step.json" if args.device == "cpu" else "train_step_cuda.json")

    import transformers

    from mask2former.config import Config, SolverConfig, TrainConfig
    from mask2former.modeling.model import Mask2Former
    from mask2former.modeling.precision import native_bf16
    from mask2former.training.build import build_criterion
    from mask2former.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    from mask2former.allocator import tune_malloc

    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()  # process-wide: applies to both libraries
    device = torch.device(args.device)
    load_before = os.getloadavg()
    theirs = build_transformers_model(args.num_classes)
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = Mask2Former.from_pretrained(directory)
    ours.to(device).train()
    theirs.to(device).train()
    batch = make_batch(args.batch, args.size, args.num_classes)
    pixel_values = ours.normalize(batch["images"].to(device), batch["padding_mask"].to(device))
    mask_labels = [t["masks"].to(device, torch.float32) for t in batch["targets"]]
    class_labels = [t["labels"].to(device) for t in batch["targets"]]

    run_dir = tempfile.mkdtemp(prefix="train_step_")
    config = Config(model=ours.config, solver=SolverConfig(batch_size=args.batch, max_iter=10 ** 6),
                    train=TrainConfig(output_dir=run_dir))

    def our_trainer(precision: str) -> Trainer:
        # Each variant trains its own copy: sharing one model would make each one's steps move the other's weights.
        precision_config = dataclasses.replace(config, solver=dataclasses.replace(config.solver, precision=precision))
        trainer = Trainer(precision_config, model=copy.deepcopy(ours), train_dataset=[None], criterion=build_criterion(
            config, args.num_classes), device=device, progress_bar=False, tensorboard=False)
        trainer.model.train()
        return trainer

    batches = itertools.repeat(batch)
    with_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and native_bf16(device))
    trainers = {"fp32": our_trainer("fp32")}
    if with_bf16:
        trainers["bf16"] = our_trainer("bf16")
    if device.type == "cuda":
        trainers["fp16"] = our_trainer("fp16")
    their_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0.05)
    their_scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    last_loss = {}

    def ours_step(precision: str):
        def step():
            result = trainers[precision].train_step(batches)
            last_loss[f"ours_{precision}"] = float(result["loss"])
        return step

    def theirs_step(precision: str):
        def step():
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
            context = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with context:
                loss = theirs(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss
            if precision == "fp16":
                their_scaler.scale(loss).backward()
                their_scaler.unscale_(their_optimizer)
                torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.01)
                their_scaler.step(their_optimizer)
                their_scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.01)
                their_optimizer.step()
            their_optimizer.zero_grad(set_to_none=True)
            last_loss[f"transformers_{precision}"] = float(loss.detach())
        return step

    variants = {"ours_fp32": ours_step("fp32"), "transformers_fp32": theirs_step("fp32")}
    if with_bf16:
        variants["ours_bf16"] = ours_step("bf16")
    if args.transformers_bf16 or device.type == "cuda":
        variants["transformers_bf16"] = theirs_step("bf16")
    if device.type == "cuda":
        variants["ours_fp16"] = ours_step("fp16")
        variants["transformers_fp16"] = theirs_step("fp16")

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first_loss = {}
    for round_index in range(args.warmup):
        for name, fn in variants.items():
            timed(fn)
            if round_index == 0:
                first_loss[name] = last_loss[name]
    times = {name: [] for name in variants}
    peak_memory = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name].append(timed(fn))
            if device.type == "cuda":
                peak_memory[name] = torch.cuda.max_memory_allocated() / 2 ** 30
            print(f"{name:22s} {times[name][-1]:8.3f} s  loss {last_loss[name]:.3f}", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("ours_fp32", "transformers_fp32"):
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                variants[name]()
            print(f"== {name}\n" + profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    median = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}

    def ratio(a: str, b: str, table: dict) -> float | None:
        return round(table[a] / table[b], 3) if a in table and b in table else None

    result = {
        "what": "one training iteration: forward + loss + backward + full-model clip 0.01 + AdamW step",
        "model": "Mask2Former Swin-T (embed 96, depths 2,2,6,2, window 7, drop path 0.3), 100 queries, "
                 f"{args.num_classes} classes, 9 decoder layers + initial prediction, deep supervision; "
                 "random unit-scale weights shared by both",
        "batch": [args.batch, 3, args.size, args.size],
        "segments_per_image": NUM_SEGMENTS,
        "loss": "12544 points, oversample 3, importance 0.75; CE 2 / mask 5 / dice 5; no-object 0.1 (both defaults)",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads,
        "malloc_tuning": malloc_tuned,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seconds_median": {name: round(value, 4) for name, value in median.items()},
        "seconds_min": {name: round(value, 4) for name, value in fastest.items()},
        "seconds_all": {name: [round(v, 4) for v in values] for name, values in times.items()},
        "ratio_ours_over_transformers_fp32": ratio("ours_fp32", "transformers_fp32", median),
        "ratio_ours_bf16_over_transformers_fp32": ratio("ours_bf16", "transformers_fp32", median),
        "ratio_ours_bf16_over_transformers_bf16": ratio("ours_bf16", "transformers_bf16", median),
        "ratio_ours_fp16_over_transformers_fp16": ratio("ours_fp16", "transformers_fp16", median),
        "ratio_of_minimums_ours_over_transformers_fp32": ratio("ours_fp32", "transformers_fp32", fastest),
        "ratio_of_minimums_ours_bf16_over_transformers_fp32": ratio("ours_bf16", "transformers_fp32", fastest),
        "first_step_loss": {name: round(value, 3) for name, value in first_loss.items()},
        "peak_memory_gib": {name: round(value, 2) for name, value in peak_memory.items()} or None,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "machine": {**machine_info(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": sys.version.split()[0]},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "seconds_all"}, indent=2))


if __name__ == "__main__":
    main()
