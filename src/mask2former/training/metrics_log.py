"""What a training run reports while it runs: ``metrics.jsonl``, TensorBoard and the tqdm bar (rank 0 only).

``metrics.jsonl`` holds one strict-JSON object per logged step (losses averaged over the iterations since the last
log and over processes, lr, throughput), per evaluation (``eval``) and per skipped update (``skipped``). On resume
the rows after the checkpoint's step are dropped: those iterations are trained again. TensorBoard gets the same
scalars and an image of one training prediction.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Config, save_config
from ..data.json_io import dumps, finite_or_none
from . import distributed as dist_utils
from .resume import atomic_write_text

logger = logging.getLogger("mask2former.train")


def flatten_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts of numbers -> ``{"a/b": float}``."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
        elif isinstance(value, Tensor) and value.numel() == 1:
            flat[f"{prefix}{key}"] = float(value)
    return flat


class MetricsLog:
    """The run's logs. Every process accumulates its loss window (the averages are collectives); only the main
    process (``enabled``) writes."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True, progress_bar: bool = True) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self.use_tensorboard = tensorboard
        self.use_progress_bar = progress_bar
        self.writer = None
        self.progress = None
        self._file = None
        self._stack: ExitStack | None = None
        self._window: dict[str, Tensor] = {}
        self._window_steps = 0
        self._window_start = self._fit_start = time.perf_counter()
        self._window_first_step = 0

    # --------------------------------------------------------------------------------------------- open / close
    def open(self, config: Config, start_step: int, resumed: bool) -> None:
        """Write ``config.yaml``, open ``metrics.jsonl`` (trimmed to ``start_step`` on resume), TensorBoard and
        the progress bar (log lines go above the bar, not through it)."""
        self._stack = ExitStack()
        if not self.enabled:
            return
        save_config(config, self.output_dir / "config.yaml")
        metrics_path = self.output_dir / "metrics.jsonl"
        if resumed and metrics_path.exists():
            kept = []
            for line in metrics_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a row torn by the kill
            atomic_write_text(metrics_path, "".join(row + "\n" for row in kept))
        elif not resumed:
            metrics_path.unlink(missing_ok=True)
        self._file = open(metrics_path, "a")
        if self.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but keep training without it
                logger.warning("tensorboard is not installed; no TensorBoard logs")
            else:
                self.writer = SummaryWriter(str(self.output_dir / "tensorboard"),
                                            purge_step=start_step if resumed else None)

    def open_progress_bar(self, total: int, initial: int) -> None:
        if not (self.enabled and self.use_progress_bar):
            return
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.progress = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)
        self._stack.enter_context(logging_redirect_tqdm(loggers=[logger]))

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # --------------------------------------------------------------------------------------------- rows
    def write_row(self, row: dict[str, Any]) -> None:
        if self.enabled and self._file is not None:
            self._file.write(dumps(row) + "\n")
            self._file.flush()

    def add_scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    # --------------------------------------------------------------------------------------------- loss window
    def start_clock(self, step: int) -> None:
        """Start timing the run (``elapsed``) and the first window at ``step``."""
        self.start_window(step)
        self._fit_start = self._window_start

    def start_window(self, step: int) -> None:
        self._window, self._window_steps = {}, 0
        self._window_start, self._window_first_step = time.perf_counter(), step

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def add_step(self, result: dict[str, Any], device: torch.device) -> None:
        """Add a finite iteration's loss terms and gradient norm (a ``Trainer.train_step`` result)."""
        for key, value in (("loss", result["loss"]), *result["losses"].items(),
                           ("grad_norm", result["grad_norm"].to(device))):
            self._window[key] = self._window.get(key, 0) + value
        self._window_steps += 1

    def log_window(self, step: int, batch_size: int, device: torch.device, lrs: dict[str, float], epoch: int,
                   after: dict[str, Any]) -> dict[str, Any]:
        """Average of the finite iterations since the last log (over processes too: every process calls this),
        the ``lrs``, throughput, ``epoch``, times, then ``after``; written and shown on the main process."""
        iterations = step - self._window_first_step
        elapsed = time.perf_counter() - self._window_start
        averages = {key: value / max(self._window_steps, 1) for key, value in self._window.items()}
        averaged = dist_utils.all_reduce_mean(averages, device) if averages else {}
        images_per_s = batch_size * max(iterations, 1) / max(elapsed, 1e-9)
        logs = {"step": step, **averaged, **lrs, "images_per_s": images_per_s,
                "step_time": elapsed / max(iterations, 1), "epoch": epoch, "time": time.time(),
                "elapsed": time.perf_counter() - self._fit_start, **after}
        if self.enabled:
            self.write_row(logs)
            self.add_scalars("train", {k: v for k, v in logs.items() if k not in ("step", "time")}, step)
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}", lr=f"{logs['lr']:.2e}",
                                          img_s=f"{images_per_s:.1f}", refresh=False)
            logger.debug("step %d: %s", step, logs)
        self.start_window(step)
        return logs

    # --------------------------------------------------------------------------------------------- image
    def add_sample_prediction(self, step: int, batch: dict[str, Any], class_logits: Tensor, mask_logits: Tensor,
                              colors: list | None) -> None:
        """TensorBoard image: input | ground-truth semantic map | predicted semantic map, for the first image of a
        training batch (from outputs already computed: no extra forward pass)."""
        if not self.enabled or self.writer is None:
            return
        from ..inference.postprocess import semantic_inference

        height, width = batch["image_sizes"][0]
        padded = batch["images"].shape[-2:]
        masks = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)[0]
        prediction = semantic_inference(class_logits, masks[:, :height, :width]).argmax(0).cpu()
        truth = batch["targets"][0]["semantic"][:height, :width]
        num_classes = class_logits.shape[-1] - 1
        palette = torch.tensor(colors, dtype=torch.uint8) if colors else torch.randint(
            0, 256, (num_classes, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        palette = torch.cat([palette, torch.zeros(256 - palette.shape[0], 3, dtype=torch.uint8)])

        def paint(labels: Tensor) -> Tensor:
            return palette[labels.clamp(0, 255)].permute(2, 0, 1)

        image = batch["images"][0, :, :height, :width]
        self.writer.add_image("train/sample_prediction", torch.cat([image, paint(truth), paint(prediction)], dim=2),
                              step)


__all__ = ["MetricsLog", "finite_or_none", "flatten_numbers"]
