"""Former home of the train entry point and the builders, kept importable for ``cli.py`` and ``benchmarks/``.

The entry point is :mod:`mask2former.apps.train`; the builders live beside what they build: ``data/build.py``,
``modeling/build.py``, ``training/build.py``. (Second pass: point the importers there and delete this module.)
"""

from .apps.train import build_evaluate_fn, run_train
from .data.build import DATASETS, build_dataset, build_datasets, build_train_transforms
from .modeling.build import build_model, check_backbone_weights
from .training.build import build_criterion

__all__ = ["DATASETS", "build_criterion", "build_dataset", "build_datasets", "build_evaluate_fn", "build_model",
           "build_train_transforms", "check_backbone_weights", "run_train"]
