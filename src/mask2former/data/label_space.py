"""The one object that owns class names, the thing/stuff split, dataset <-> contiguous ids and the ignore value."""

from __future__ import annotations

import colorsys
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

Color = tuple[int, int, int]

# Golden-ratio hue steps spread consecutive classes far apart on the colour wheel; the saturation/value cycles
# separate classes whose hues land close together.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_SATURATIONS = (0.85, 0.55, 0.95)
_VALUES = (0.95, 0.75, 0.55)


def default_colors(num_classes: int) -> list[Color]:
    """Distinct, deterministic colours; the colour of class i depends only on i (not on the number of classes)."""
    colors: list[Color] = []
    used: set[Color] = {(0, 0, 0)}  # black is kept for void in overlays
    for index in range(num_classes):
        hue = (index * _GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation = _SATURATIONS[index % 3]
        value = _VALUES[(index // 3) % 3]
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        color = (round(red * 255), round(green * 255), round(blue * 255))
        # Quantisation can collide for large class counts: nudge deterministically until unused.
        step = 0
        while color in used:
            step += 1
            color = ((color[0] + 7 * step) % 256, (color[1] + 13 * step) % 256, (color[2] + 29 * step) % 256)
        used.add(color)
        colors.append(color)
    return colors


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"LabelSpace: {what} must be an int, got {value!r}")
    return int(value)


class LabelSpace:
    """Class names, thing/stuff flags, dataset ids and colours, validated once at construction.

    Contiguous ids are the positions in ``names`` (0..K-1); dataset ids are whatever the files use
    (COCO category ids, Cityscapes label ids, raw PNG values...). ``ignore_index`` marks unlabelled pixels in
    semantic targets and may be neither a contiguous id nor a dataset id.
    """

    def __init__(
        self,
        names: Sequence[str],
        is_thing: Sequence[bool],
        dataset_ids: Sequence[int] | None = None,
        ignore_index: int = 255,
        colors: Sequence[Sequence[int]] | None = None,
    ) -> None:
        names = list(names)
        is_thing = list(is_thing)
        num_classes = len(names)
        if num_classes == 0:
            raise ValueError("LabelSpace: needs at least one class")
        if len(is_thing) != num_classes:
            raise ValueError(f"LabelSpace: {num_classes} names but {len(is_thing)} is_thing flags")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"LabelSpace: class names must be non-empty strings, got {name!r}")
        duplicate_names = sorted({name for name in names if names.count(name) > 1})
        if duplicate_names:
            raise ValueError(f"LabelSpace: duplicate class names {duplicate_names}")
        for flag in is_thing:
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"LabelSpace: is_thing flags must be bools, got {flag!r}")
        ignore_index = _check_int(ignore_index, "ignore_index")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"LabelSpace: ignore_index {ignore_index} collides with contiguous id {ignore_index} "
                             f"({num_classes} classes)")

        if dataset_ids is None:
            dataset_ids = list(range(num_classes))
        dataset_ids = [_check_int(value, "dataset id") for value in dataset_ids]
        if len(dataset_ids) != num_classes:
            raise ValueError(f"LabelSpace: {num_classes} names but {len(dataset_ids)} dataset ids")
        if any(value < 0 for value in dataset_ids):
            raise ValueError(f"LabelSpace: dataset ids must be >= 0, got {min(dataset_ids)}")
        duplicate_ids = sorted({value for value in dataset_ids if dataset_ids.count(value) > 1})
        if duplicate_ids:
            raise ValueError(f"LabelSpace: duplicate dataset ids {duplicate_ids}")
        if ignore_index in dataset_ids:
            clashing = names[dataset_ids.index(ignore_index)]
            raise ValueError(f"LabelSpace: dataset id {ignore_index} (class {clashing!r}) "
                             f"collides with ignore_index {ignore_index}")

        if colors is None:
            colors = default_colors(num_classes)
        colors = [tuple(color) for color in colors]
        if len(colors) != num_classes:
            raise ValueError(f"LabelSpace: {num_classes} names but {len(colors)} colors")
        for color in colors:
            if len(color) != 3 or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c <= 255
                                      for c in color):
                raise ValueError(f"LabelSpace: colors must be 3 ints in [0, 255], got {color!r}")

        self.names: list[str] = names
        self.is_thing: list[bool] = [bool(flag) for flag in is_thing]
        self.dataset_ids: list[int] = dataset_ids
        self.ignore_index: int = ignore_index
        self.colors: list[Color] = [(int(c[0]), int(c[1]), int(c[2])) for c in colors]
        self._dataset_to_contiguous = {value: index for index, value in enumerate(dataset_ids)}

    # ----------------------------------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def thing_ids(self) -> list[int]:
        """Contiguous ids of thing classes."""
        return [index for index, flag in enumerate(self.is_thing) if flag]

    @property
    def stuff_ids(self) -> list[int]:
        """Contiguous ids of stuff classes."""
        return [index for index, flag in enumerate(self.is_thing) if not flag]

    # ----------------------------------------------------------------------------------------- id mapping
    def to_contiguous(self, dataset_id: int, where: str = "") -> int:
        """Contiguous id of a dataset id; a ValueError naming ``where`` and the id if it is unknown."""
        try:
            return self._dataset_to_contiguous[int(dataset_id)]
        except (KeyError, TypeError, ValueError):
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}unknown category id {dataset_id!r} (label space has {self.num_classes} classes, "
                             f"dataset ids {_short_list(self.dataset_ids)})") from None

    def to_dataset(self, contiguous_id: int) -> int:
        """Dataset id of a contiguous id."""
        contiguous_id = int(contiguous_id)
        if not 0 <= contiguous_id < self.num_classes:
            raise ValueError(f"contiguous id {contiguous_id} out of range [0, {self.num_classes})")
        return self.dataset_ids[contiguous_id]

    def lookup_table(self, size: int) -> np.ndarray:
        """int64 array of length ``size``: dataset id -> contiguous id, -1 for ids not in the label space."""
        table = np.full(size, -1, dtype=np.int64)
        for index, value in enumerate(self.dataset_ids):
            if value < size:
                table[value] = index
        return table

    def class_map_to(self, data: "LabelSpace", where: str = "") -> np.ndarray:
        """Where each of this (a model's) label space's classes sits in ``data``, a data set's label space with a
        subset of its classes: int64 ``[self.num_classes]``, the data set's contiguous id or -1 for a class the
        data set does not have. Classes match by dataset id and name, as detectron2 maps a panoptic model's
        classes onto COCO's instance JSON (``thing_dataset_id_to_contiguous_id``): COCO's 80 instance categories
        are the 133 panoptic ones' things with the same ids. Colours and ``ignore_index`` need not agree. A data
        set class the model does not have, or has with another thing/stuff flag, is a ValueError naming them."""
        prefix = f"{where}: " if where else ""
        own = {(dataset_id, name): index for index, (dataset_id, name) in enumerate(zip(self.dataset_ids, self.names))}
        unknown = [f"{name!r} (id {dataset_id})" for dataset_id, name in zip(data.dataset_ids, data.names)
                   if (dataset_id, name) not in own]
        if unknown:
            raise ValueError(f"{prefix}the data set has {len(unknown)} class(es) the model does not know (matched by "
                             f"id and name): {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
        flipped = [repr(name) for dataset_id, name, thing in zip(data.dataset_ids, data.names, data.is_thing)
                   if self.is_thing[own[(dataset_id, name)]] != thing]
        if flipped:
            raise ValueError(f"{prefix}class(es) {', '.join(flipped[:8])} are things in one of the model and the data "
                             f"set and stuff in the other")
        class_map = np.full(self.num_classes, -1, dtype=np.int64)
        for index, (dataset_id, name) in enumerate(zip(data.dataset_ids, data.names)):
            class_map[own[(dataset_id, name)]] = index
        return class_map

    def is_thing_tensor(self) -> torch.Tensor:
        return torch.tensor(self.is_thing, dtype=torch.bool)

    # ----------------------------------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "is_thing": list(self.is_thing),
            "dataset_ids": list(self.dataset_ids),
            "ignore_index": self.ignore_index,
            "colors": [list(color) for color in self.colors],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelSpace":
        unknown = set(data) - {"names", "is_thing", "dataset_ids", "ignore_index", "colors"}
        if unknown:
            raise ValueError(f"LabelSpace.from_dict: unknown keys {sorted(unknown)}")
        if "names" not in data:
            raise ValueError("LabelSpace.from_dict: missing key 'names'")
        names = data["names"]
        return cls(
            names=names,
            is_thing=data.get("is_thing", [False] * len(names)),
            dataset_ids=data.get("dataset_ids"),
            ignore_index=data.get("ignore_index", 255),
            colors=data.get("colors"),
        )

    @classmethod
    def from_coco_categories(cls, categories: Sequence[dict[str, Any]], ignore_index: int = 255,
                             where: str = "") -> "LabelSpace":
        """From a COCO ``categories`` list (``id``, ``name``, optional ``isthing`` (default 1) and ``color``),
        in ascending id order as detectron2 does. Without colours, a built-in table with the same ids and names
        (COCO's 80 or 133 classes) gives them; else ``default_colors``."""
        prefix = f"{where}: " if where else ""
        for category in categories:
            if "id" not in category or "name" not in category:
                raise ValueError(f"{prefix}category without 'id' or 'name': {category!r}")
        ordered = sorted(categories, key=lambda category: category["id"])
        names = [str(category["name"]) for category in ordered]
        dataset_ids = [category["id"] for category in ordered]
        colors = [category["color"] for category in ordered] if all("color" in c for c in ordered) else None
        if colors is None:
            # COCO's instances_*.json has no colours: the known COCO classes take detectron2's (the built-in table).
            known = match_builtin_names(names)
            if known is not None and _builtin_dict(known)["dataset_ids"] == dataset_ids:
                colors = _builtin_dict(known)["colors"]
        try:
            return cls(
                names=names,
                is_thing=[bool(category.get("isthing", 1)) for category in ordered],
                dataset_ids=dataset_ids,
                ignore_index=ignore_index,
                colors=colors,
            )
        except ValueError as error:
            raise ValueError(f"{prefix}{error}") from None

    def to_coco_categories(self) -> list[dict[str, Any]]:
        return [
            {"id": dataset_id, "name": name, "supercategory": "thing" if thing else "stuff",
             "isthing": int(thing), "color": list(color)}
            for dataset_id, name, thing, color in zip(self.dataset_ids, self.names, self.is_thing, self.colors)
        ]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "LabelSpace":
        """Read a YAML file in either form:

        ``names: [...]`` with optional ``is_thing``, ``dataset_ids``, ``ignore_index``, ``colors`` (the ``to_dict``
        form), or
        ``classes: [{name: ..., isthing: ..., id: ..., color: [r, g, b]}, ...]`` with optional ``ignore_index``
        (each class needs only ``name``; classes without ``id`` take their position).
        """
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label space file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with 'names' or 'classes'")
        try:
            if "classes" in data:
                unknown = set(data) - {"classes", "ignore_index"}
                if unknown:
                    raise ValueError(f"unknown keys {sorted(unknown)}")
                classes = data["classes"]
                if not isinstance(classes, list) or not all(isinstance(item, dict) for item in classes):
                    raise ValueError("'classes' must be a list of mappings")
                for item in classes:
                    extra = set(item) - {"name", "isthing", "is_thing", "id", "color"}
                    if extra:
                        raise ValueError(f"unknown class keys {sorted(extra)} in {item!r}")
                    if "name" not in item:
                        raise ValueError(f"class without 'name': {item!r}")
                has_colors = all("color" in item for item in classes)
                return cls(
                    names=[str(item["name"]) for item in classes],
                    is_thing=[bool(item.get("isthing", item.get("is_thing", False))) for item in classes],
                    dataset_ids=[item.get("id", index) for index, item in enumerate(classes)],
                    ignore_index=data.get("ignore_index", 255),
                    colors=[item["color"] for item in classes] if has_colors else None,
                )
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))

    # ----------------------------------------------------------------------------------------- misc
    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSpace) and self.to_dict() == other.to_dict()

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        return (f"LabelSpace(num_classes={self.num_classes}, things={len(self.thing_ids)}, "
                f"stuff={len(self.stuff_ids)}, ignore_index={self.ignore_index})")


# ------------------------------------------------------------------------------------------------- built-in tables
# The reference data sets' label spaces, as YAML tables shipped in the package (label_spaces/*.yaml).
_BUILTIN_DIR = Path(__file__).with_name("label_spaces")
BUILTIN_LABEL_SPACES = ("coco_panoptic", "coco_instance", "ade20k", "cityscapes")


@lru_cache(maxsize=None)
def _builtin_dict(name: str) -> dict[str, Any]:
    if name == "coco_instance":
        # COCO instance segmentation is the 80 thing classes of the panoptic table (same ids, names, colours).
        panoptic = _builtin_dict("coco_panoptic")
        keep = [index for index, flag in enumerate(panoptic["is_thing"]) if flag]
        return {key: [panoptic[key][i] for i in keep] if isinstance(panoptic[key], list) else panoptic[key]
                for key in panoptic}
    return LabelSpace.from_yaml(_BUILTIN_DIR / f"{name}.yaml").to_dict()


def builtin_label_space(name: str) -> LabelSpace:
    """A reference data set's label space: ``coco_panoptic`` (133 classes, 80 things, COCO category ids),
    ``coco_instance`` (its 80 things), ``ade20k`` (150 stuff classes, ids = raw PNG values 1..150) or
    ``cityscapes`` (19 train classes, 8 things, ids = official label ids). A new object on each call."""
    if name not in BUILTIN_LABEL_SPACES:
        raise ValueError(f"unknown built-in label space {name!r} (known: {', '.join(BUILTIN_LABEL_SPACES)})")
    return LabelSpace.from_dict(_builtin_dict(name))


def match_builtin_names(names: Sequence[str]) -> str | None:
    """The built-in label space whose class names are exactly ``names``, in order; None if none is."""
    names = list(names)
    for name in BUILTIN_LABEL_SPACES:
        if _builtin_dict(name)["names"] == names:
            return name
    return None


def _short_list(values: Sequence[int], limit: int = 12) -> str:
    if len(values) <= limit:
        return str(list(values))
    return "[" + ", ".join(str(v) for v in values[:limit]) + f", ... ({len(values)} total)]"
