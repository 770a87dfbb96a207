"""Score a folder of standard results files with the standard tools themselves, not with our evaluator.

PQ with panopticapi's algorithm as shipped in cityscapesscripts (``pq_compute_single_core`` + ``average_pq``) on
``DIR/panoptic.json`` + ``DIR/panoptic/``; mask AP with pycocotools (``COCO.loadRes`` + ``COCOeval``, segm) on
``DIR/instances.json``. ``ROOT`` is a COCO-panoptic layout as ``mask2former data export --format coco-panoptic``
writes it (``annotations/panoptic_{split}.json``, ``panoptic_{split}/``, ``annotations/instances_{split}.json``).

Usage: python scripts/score_with_standard_tools.py ROOT DIR [--split val]
(needs the test extras: ``pip install -e ".[test]"``)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as panopticapi
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def panoptic_quality(root: Path, predictions: Path, split: str) -> dict:
    gt = json.loads((root / "annotations" / f"panoptic_{split}.json").read_text())
    pred = {entry["image_id"]: entry for entry in json.loads((predictions / "panoptic.json").read_text())["annotations"]}
    categories = {category["id"]: category for category in gt["categories"]}
    pairs = [(annotation, pred[annotation["image_id"]]) for annotation in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stats = panopticapi.pq_compute_single_core(0, pairs, str(root / f"panoptic_{split}"),
                                                   str(predictions / "panoptic"), categories)
    return panopticapi.average_pq(stats, categories)


def mask_ap(root: Path, predictions: Path, split: str) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / f"instances_{split}.json"))
        evaluator = COCOeval(gt, gt.loadRes(str(predictions / "instances.json")), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return 100.0 * evaluator.stats[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("predictions", type=Path)
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    result = {}
    if (args.predictions / "panoptic.json").exists():
        pq = panoptic_quality(args.root, args.predictions, args.split)
        result.update({"PQ": 100 * pq["All"]["pq"], "PQ_th": 100 * pq["Things"]["pq"], "PQ_st": 100 * pq["Stuff"]["pq"]})
    if (args.predictions / "instances.json").exists():
        result["AP"] = mask_ap(args.root, args.predictions, args.split)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
