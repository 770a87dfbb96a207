"""Where a COCO instances JSON and its images sit under ``data.root``: detectron2's layout, CVAT's "COCO 1.0"
export and Roboflow's, so ``data.dataset=coco data.root=...`` finds them without ``data.extra``."""

from __future__ import annotations

from pathlib import Path

# Roboflow names the validation split "valid".
_SPLIT_ALIASES = {"val": ("val", "valid", "validation"), "valid": ("valid", "val")}


def find_coco_layout(root: Path, split: str, single: bool = True) -> tuple[Path, Path]:
    """``(annotation JSON, image folder)`` of ``split``, tried in this order:

    1. detectron2: ``annotations/instances_<split>.json`` + ``<split>/`` (or CVAT's ``images/<split>/`` or
       ``images/``);
    2. Roboflow: ``<split>/_annotations.coco.json`` beside its images (``val`` also finds ``valid``);
    3. CVAT "COCO 1.0" with one subset: ``annotations/instances_default.json`` + ``images/`` (``images/default/``),
       only for the training split (``single``); hold validation out with ``data.val_fraction``.

    Nothing found is a FileNotFoundError listing what was tried."""
    tried = []
    for name in _SPLIT_ALIASES.get(split, (split,)):
        annotation = root / "annotations" / f"instances_{name}.json"
        tried.append(str(annotation))
        if annotation.is_file():
            for images in (root / name, root / "images" / name, root / "images"):
                if images.is_dir():
                    return annotation, images
            return annotation, root / name  # the reader names the missing image files
        roboflow = root / name / "_annotations.coco.json"
        tried.append(str(roboflow))
        if roboflow.is_file():
            return roboflow, root / name
    cvat = root / "annotations" / "instances_default.json"
    tried.append(f"{cvat} (the training split only)")
    if single and cvat.is_file():
        images = root / "images" / "default"
        return cvat, images if images.is_dir() else root / "images"
    raise FileNotFoundError(f"coco: no {split!r} annotations under {root} (tried {', '.join(tried)}); set "
                            f"data.extra.{{train,val}}_annotations/_images, or data.val_fraction for a data set with "
                            f"one split")
