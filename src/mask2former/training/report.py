"""What ``mask2former train`` leaves for a person to look at: loss/metric curves and prediction overlays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

from ..config import TestConfig  # noqa: E402


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows (with a ``loss``) and evaluation rows (with ``eval``) of a ``metrics.jsonl``."""
    train_rows, eval_rows = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "eval" in row:
            eval_rows.append(row)
        elif row.get("loss") is not None and not row.get("skipped"):
            train_rows.append(row)
    return train_rows, eval_rows


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Total loss and learning rate against steps, and PQ / mIoU / AP at each evaluation, as one PNG."""
    train_rows, eval_rows = read_metrics(metrics_path)
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if train_rows:
        steps = [row["step"] for row in train_rows]
        loss_axis.plot(steps, [row["loss"] for row in train_rows], label="total loss")
        loss_axis.set_yscale("log")
        lr_axis = loss_axis.twinx()
        lr_axis.plot(steps, [row.get("lr", float("nan")) for row in train_rows], color="tab:gray", lw=1, label="lr")
        lr_axis.set_ylabel("learning rate")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss (log scale)")
    loss_axis.set_title("training loss")
    for key in ("PQ", "mIoU", "AP"):
        points = [(row["step"], row["eval"][key]) for row in eval_rows if row["eval"].get(key) is not None]
        if points:
            metric_axis.plot(*zip(*points), marker="o", label=key)
    metric_axis.set_xlabel("step")
    metric_axis.set_ylabel("%")
    metric_axis.set_title("validation")
    if metric_axis.get_legend_handles_labels()[0]:
        metric_axis.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path


def write_overlays(model, val_dataset, label_space, out_dir: str | Path, test: TestConfig, count: int = 6,
                   precision: str = "fp32") -> list[Path]:
    """Ground truth next to the prediction for the first ``count`` validation images, predicted for ``test.task``
    with every ``test`` setting (sizes, thresholds, ``top_k``)."""
    from ..inference.predictor import Predictor
    from ..viz import compare

    task = test.task
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model, task=task, device=next(model.parameters()).device, label_space=label_space,
                          precision=precision, **test.predictor_options())
    paths = []
    for index in range(min(count, len(val_dataset))):
        sample = val_dataset[index]
        result = predictor(sample["image"])
        path = out_dir / f"val_{index:03d}_{task}.png"
        compare(sample, result, task, label_space, path=path)
        paths.append(path)
    model.train()
    return paths
