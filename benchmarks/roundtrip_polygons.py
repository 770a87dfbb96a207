"""Round trip of FashionScenes samples through the polygon formats: export (labelme / YOLO), read back, compare.

Prints, per format: the pixel agreement of the semantic maps, the samples whose targets come back identical (same
segments: label, mask and crowd flag, in any order) and the export/read times (wall clock on this machine).
YOLO is compared on thing segments only (it holds no stuff).

    PYTHONPATH=src python benchmarks/roundtrip_polygons.py --num-images 200 --image-size 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mask2former.data.export import export_samples
from mask2former.data.fashion_scenes import FashionScenes
from mask2former.data.formats import LabelmeDataset, YoloDataset


def segments(labels: np.ndarray, masks: np.ndarray, crowd: np.ndarray) -> list[tuple[int, bool, bytes]]:
    return sorted((int(label), bool(flag), np.packbits(mask).tobytes())
                  for label, mask, flag in zip(labels, masks, crowd))


def compare(samples, read_back, things_only: np.ndarray | None) -> tuple[float, int]:
    agree = total = identical = 0
    for sample, back in zip(samples, read_back):
        labels, masks, crowd = (sample[key].numpy() for key in ("labels", "masks", "iscrowd"))
        semantic = sample["semantic"].numpy()
        if things_only is not None:
            keep = things_only[labels]
            labels, masks, crowd = labels[keep], masks[keep], np.zeros(int(keep.sum()), dtype=bool)
            semantic = np.where(np.isin(semantic, np.flatnonzero(things_only)), semantic, 255)
        agree += int((semantic == back["semantic"].numpy()).sum())
        total += semantic.size
        identical += segments(labels, masks, crowd) == segments(
            back["labels"].numpy(), back["masks"].numpy(), back["iscrowd"].numpy())
    return agree / total, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    dataset = FashionScenes(split="train", num_images=args.num_images, seed=0, image_size=args.image_size)
    samples = [dataset[index] for index in range(len(dataset))]
    things = np.array(dataset.label_space.is_thing, dtype=bool)
    with tempfile.TemporaryDirectory() as tmp:
        for format in ("labelme", "yolo"):
            out = Path(tmp) / format
            start = time.perf_counter()
            export_samples(samples, dataset.label_space, out, format=format, split="train")
            exported = time.perf_counter() - start
            start = time.perf_counter()
            reader = LabelmeDataset(out / "train") if format == "labelme" else YoloDataset(out / "data.yaml", "train")
            read_back = [reader[index] for index in range(len(reader))]
            read = time.perf_counter() - start
            agreement, identical = compare(samples, read_back, things if format == "yolo" else None)
            print(f"{format}: semantic pixel agreement {agreement:.6f}, identical targets {identical}/{len(samples)}, "
                  f"export {exported / len(samples) * 1000:.1f} ms/image, read {read / len(samples) * 1000:.1f} "
                  f"ms/image")


if __name__ == "__main__":
    main()
