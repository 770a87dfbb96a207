"""Regenerate src/mask2former/assets/fashion_mnist_subset.npz from the Debian `dataset-fashion-mnist` files.

The subset is class-balanced and takes the first items of each class in file order:
- train: 200 per class (2000 items) from train-*-ubyte.gz;
- t10k: 50 per class from indices < 5000 (FashionScenes "val") and 50 per class from indices >= 5000 ("test").
Each item keeps its index in the original file, so the subset is traceable and its scenes never mix splits.

Usage: python scripts/make_fashion_mnist_subset.py [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mask2former.data import fashion_mnist

TRAIN_PER_CLASS = 200
T10K_PER_CLASS_PER_HALF = 50


def first_per_class(labels: np.ndarray, candidates: np.ndarray, per_class: int) -> np.ndarray:
    chosen = []
    for class_id in range(len(fashion_mnist.CLASS_NAMES)):
        matching = candidates[labels[candidates] == class_id]
        if len(matching) < per_class:
            raise ValueError(f"only {len(matching)} items of class {class_id}, need {per_class}")
        chosen.append(matching[:per_class])
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "src/mask2former/assets" / fashion_mnist.SUBSET_RESOURCE
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()

    train = fashion_mnist.load_items("train", source="full")
    t10k = fashion_mnist.load_items("t10k", source="full")
    train_indices = first_per_class(train.labels, np.arange(len(train.labels)), TRAIN_PER_CLASS)
    half = len(t10k.labels) // 2
    t10k_indices = np.concatenate([
        first_per_class(t10k.labels, np.arange(half), T10K_PER_CLASS_PER_HALF),
        first_per_class(t10k.labels, np.arange(half, len(t10k.labels)), T10K_PER_CLASS_PER_HALF),
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        train_images=train.images[train_indices], train_labels=train.labels[train_indices].astype(np.uint8),
        train_indices=train_indices.astype(np.int32),
        t10k_images=t10k.images[t10k_indices], t10k_labels=t10k.labels[t10k_indices].astype(np.uint8),
        t10k_indices=t10k_indices.astype(np.int32),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(train_indices)} train + "
          f"{len(t10k_indices)} t10k items")


if __name__ == "__main__":
    main()
