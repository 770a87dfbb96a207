"""FashionScenes throughput: plain generation and DataLoader (+ collate) with 0 and 2 workers.

Usage: python benchmarks/data_loading.py [--num-images 256] [--image-size 256] [--batch-size 8] [--source auto]
Writes benchmarks/results/data_loading.json. Numbers depend on how busy the CPU cores are; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mask2former.data import FashionScenes, collate


def time_generation(dataset: FashionScenes) -> float:
    dataset[0]  # load textures and items outside the timed loop
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return len(dataset) / (time.perf_counter() - start)


def time_loader(dataset: FashionScenes, num_workers: int, batch_size: int) -> dict[str, float]:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                        persistent_workers=False)
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)  # includes worker start-up
    first_batch_s = time.perf_counter() - start
    steady_start = time.perf_counter()
    steady_images = 0
    for batch in iterator:
        steady_images += batch["images"].shape[0]
    steady_s = time.perf_counter() - steady_start
    total_s = time.perf_counter() - start
    return {"num_workers": num_workers, "batch_size": batch_size, "first_batch_s": round(first_batch_s, 3),
            "images_per_s_total": round((steady_images + first["images"].shape[0]) / total_s, 1),
            "images_per_s_steady": round(steady_images / steady_s, 1) if steady_images else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_loading.json")
    args = parser.parse_args()

    torch.set_num_threads(1)  # generation is numpy/PIL; keep torch from competing with the workers
    dataset = FashionScenes("train", num_images=args.num_images, seed=0, image_size=args.image_size,
                            source=args.source)
    results = {
        "dataset": repr(dataset),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),  # other processes sharing the cores
        "platform": platform.platform(),
        "torch": torch.__version__,
        "generation_images_per_s": round(time_generation(dataset), 1),
        "loader": [time_loader(dataset, workers, args.batch_size) for workers in (0, 2)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
