"""A model's predictions, restated in the label space of a data set that has a subset of the model's classes.

The original scores its COCO panoptic models' AP on ``instances_val2017.json``, whose 80 categories are the
panoptic set's things with the same ids: the model predicts its own classes, detectron2 maps them to the data
set's category ids through ``thing_dataset_id_to_contiguous_id``, and the instance inference keeps thing classes
only. Here any data set whose classes are a subset of the model's (matched by id and name,
``LabelSpace.class_map_to``) is scored the same way: the model predicts in its own label space (so the top-k,
the thing/stuff split and the panoptic merge are the model's own), then every prediction of a class the data set
has is renamed to the data set's contiguous id, and a prediction of a class it lacks is not scored as any class:

- instance: the detection is dropped (after the top-k, as the original drops stuff detections);
- panoptic: the segment becomes void (0), so the ground truth under it is unmatched (a missed segment) and it is
  no false positive of any class of the data set;
- semantic: the pixel becomes -1, "none of the data set's classes": a miss of the ground truth's class there
  and a prediction of no class (mmseg's ``intersect_and_union`` counts an out-of-range prediction the same way).

Results files (``--save-predictions``) then hold the data set's category ids; a semantic -1 pixel is written as
the data set's ``ignore_index``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from ..data.label_space import LabelSpace

__all__ = ["LabelSubset"]


class LabelSubset:
    """Maps ``Predictor`` results in ``model``'s contiguous ids to ``data``'s (see the module docstring)."""

    def __init__(self, model: LabelSpace, data: LabelSpace, where: str = "") -> None:
        self.model = model
        self.data = data
        self.class_map = model.class_map_to(data, where)  # raises for classes the model does not know
        self._table = torch.from_numpy(self.class_map)

    @property
    def is_identity(self) -> bool:
        """The same classes in the same order (colours or ignore value may differ): nothing to map."""
        return self.model.num_classes == self.data.num_classes and bool(
            (self.class_map == np.arange(self.model.num_classes)).all())

    @property
    def unscored_names(self) -> list[str]:
        """The model's classes that the data set lacks."""
        return [name for name, index in zip(self.model.names, self.class_map.tolist()) if index < 0]

    def __call__(self, result: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(result)
        if "instance" in result:
            out["instance"] = self.instance(result["instance"])
        if "panoptic" in result:
            out["panoptic"] = self.panoptic(*result["panoptic"])
        if "semantic" in result:
            out["semantic"] = self.semantic(result["semantic"])
        return out

    def instance(self, instances: Mapping[str, Tensor]) -> dict[str, Tensor]:
        labels = self._table.to(instances["labels"].device)[instances["labels"].long()]
        keep = labels >= 0
        count = int(labels.shape[0])
        out = {key: (value[keep] if isinstance(value, Tensor) and value.ndim and value.shape[0] == count else value)
               for key, value in instances.items()}
        out["labels"] = labels[keep]
        return out

    def panoptic(self, segment_map: Tensor, segments_info: list[dict[str, Any]]) -> tuple[Tensor, list[dict[str, Any]]]:
        segment_map = torch.as_tensor(segment_map)
        kept, dropped = [], []
        for info in segments_info:
            category = int(self.class_map[int(info["category_id"])])
            if category < 0:
                dropped.append(int(info["id"]))
            else:
                kept.append({**info, "category_id": category, "isthing": self.data.is_thing[category]})
        if dropped:
            void = torch.isin(segment_map, torch.tensor(dropped, dtype=segment_map.dtype, device=segment_map.device))
            segment_map = segment_map.masked_fill(void, 0)
        return segment_map, kept

    def semantic(self, semantic: Tensor) -> Tensor:
        semantic = torch.as_tensor(semantic)
        return self._table.to(semantic.device)[semantic.long()]
