"""Write docs/fashion_scenes_contact_sheet.png: FashionScenes samples next to their panoptic overlays.

Overlay: each segment blended with its class colour (things: the class colour lightened per instance so touching
instances differ), white segment boundaries, and a legend of the classes.

Usage: python scripts/contact_sheet.py [--split val] [--seed 0] [--num 6] [--out docs/fashion_scenes_contact_sheet.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mask2former.data import FashionScenes


def panoptic_overlay(sample: dict, colors: list[tuple[int, int, int]], alpha: float = 0.55) -> np.ndarray:
    image = sample["image"].permute(1, 2, 0).numpy().astype(np.float32)
    masks = sample["masks"].numpy()
    segment_ids = np.zeros(image.shape[:2], dtype=np.int64)
    overlay = image.copy()
    instance_of_class: dict[int, int] = {}
    for number, (label, mask) in enumerate(zip(sample["labels"].tolist(), masks), start=1):
        shade = instance_of_class.get(label, 0)
        instance_of_class[label] = shade + 1
        color = np.array(colors[label], dtype=np.float32)
        color = color + (255.0 - color) * min(0.15 * shade, 0.6)
        overlay[mask] = (1 - alpha) * image[mask] + alpha * color
        segment_ids[mask] = number
    boundary = np.zeros(segment_ids.shape, dtype=bool)
    boundary[:, :-1] |= segment_ids[:, :-1] != segment_ids[:, 1:]
    boundary[:-1, :] |= segment_ids[:-1, :] != segment_ids[1:, :]
    overlay[boundary] = 255
    return np.clip(overlay, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=6)
    parser.add_argument("--columns", type=int, default=2, help="sample pairs per row")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "docs" / "fashion_scenes_contact_sheet.png")
    args = parser.parse_args()

    dataset = FashionScenes(args.split, num_images=args.num, seed=args.seed)
    space = dataset.label_space
    height, width = dataset.image_size
    rows = -(-args.num // args.columns)
    legend_height = 24 * (-(-space.num_classes // 5)) + 8
    sheet = Image.new("RGB", (2 * width * args.columns, height * rows + legend_height), (255, 255, 255))
    for index in range(args.num):
        sample = dataset[index]
        row, column = divmod(index, args.columns)
        origin = (2 * width * column, height * row)
        sheet.paste(Image.fromarray(sample["image"].permute(1, 2, 0).numpy()), origin)
        sheet.paste(Image.fromarray(panoptic_overlay(sample, space.colors)), (origin[0] + width, origin[1]))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    cell = sheet.width // 5
    for class_id, (name, color) in enumerate(zip(space.names, space.colors)):
        row, column = divmod(class_id, 5)
        x, y = column * cell + 6, height * rows + 6 + 24 * row
        draw.rectangle([x, y, x + 14, y + 14], fill=tuple(color), outline=(0, 0, 0))
        kind = "thing" if space.is_thing[class_id] else "stuff"
        draw.text((x + 20, y + 1), f"{name} ({kind})", fill=(0, 0, 0), font=font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height}, {args.out.stat().st_size / 1e6:.2f} MB) from {dataset!r}")


if __name__ == "__main__":
    main()
