"""Iteration-based trainer (detectron2-style ``max_iter`` loop, Lightning-style conveniences).

One iteration = ``solver.accumulation_steps`` forward/backward passes of ``per-device batch`` images on each process,
then one optimiser step; ``solver.batch_size`` is the global batch (see ``distributed.py``). Each iteration:
normalise (padded pixels set to 0 afterwards, as the reference pads the normalised batch), forward under autocast
(``solver.precision``), drop crowd segments, criterion in fp32, backward (DDP gradient sync only on the last pass),
then, unless the loss was non-finite anywhere: unscale (fp16), clip the full-model gradient norm, step. The lr
schedule advances every iteration, skipped or not (like detectron2 under AMP). With ``mask_piloting.enabled`` the
MP-Former piloting queries are built from each batch's targets and passed to the model.

Normalisation of the mask losses: across processes the criterion all-reduces the mask count (as the reference), so
N processes equal one process with an N-times batch (the class loss stays a per-process weighted mean, as in the
reference). Gradient accumulation instead sums micro-batches that are each
normalised by their own mask count; it equals the larger batch exactly when the micro-batches hold equally many
masks (the usual approximation of accumulation in detection trainers).

Outputs in ``train.output_dir``: ``checkpoints/`` (see ``checkpoint.py``), ``metrics.jsonl`` (one JSON object per
logged step), ``tensorboard/`` (scalars and an image of one training prediction), ``config.yaml``,
``model_best/`` and ``model_final/`` (loadable with ``Mask2Former.from_pretrained``).

Exact resume: a checkpoint holds the model, optimiser, scheduler, GradScaler, the step, the samples consumed (the
data order is a function of (seed, epoch), see ``sampler.py``), the best metric, the non-finite counter and every
RNG state (Python, NumPy, torch CPU/CUDA, the point-sampling generator), per process. ``fit(resume=True)`` on CPU
therefore ends bit-for-bit where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import Config, save_config, to_dict
from . import distributed as dist_utils
from .checkpoint import (
    atomic_save_pretrained,
    atomic_write_text,
    capture_rng_state,
    find_last_checkpoint,
    load_training_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_training_checkpoint,
)
from .optim import build_optimizer, build_scheduler, clip_grad_norm, lr_summary
from .sampler import SeededDataset, TrainSampler, derive_seed

logger = logging.getLogger("mask2former.train")

CHECKPOINT_VERSION = 1
EvaluateFn = Callable[[nn.Module, Any], dict]
DEFAULT_BEST_METRIC = {"panoptic": "PQ", "semantic": "mIoU", "instance": "AP"}


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` iterations in a row had a NaN/inf loss or gradient norm."""


class Callback:
    """Hooks, Lightning-style; override what you need. ``logs`` are the values written to ``metrics.jsonl``."""

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", step: int, logs: dict[str, Any] | None) -> None: ...

    def on_evaluate(self, trainer: "Trainer", step: int, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", step: int, path: Path) -> None: ...

    def on_train_end(self, trainer: "Trainer", result: dict[str, Any]) -> None: ...


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def remove_crowd(target: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Criterion target (INTERFACES.md) from a collated target: crowd segments dropped, on ``device``."""
    labels, masks = target["labels"], target["masks"]
    iscrowd = target.get("iscrowd")
    if iscrowd is not None and bool(iscrowd.any()):
        keep = ~iscrowd.bool()
        labels, masks = labels[keep], masks[keep]
    return {"labels": labels.to(device, non_blocking=True), "masks": masks.to(device, non_blocking=True)}


def lookup_metric(metrics: dict[str, Any], name: str) -> float | None:
    """``metrics[name]``, also through nested dicts (``"panoptic/PQ"`` or a bare ``"PQ"`` found one level down)."""
    if name in metrics and isinstance(metrics[name], (int, float)):
        return float(metrics[name])
    node: Any = metrics
    for part in name.replace(".", "/").split("/"):
        if not isinstance(node, dict) or part not in node:
            node = None
            break
        node = node[part]
    if isinstance(node, (int, float)):
        return float(node)
    for value in metrics.values():
        if isinstance(value, dict):
            found = lookup_metric(value, name)
            if found is not None:
                return found
    return None


def _finite_or_none(value: Any) -> Any:
    """NaN/inf -> None, so that metrics.jsonl is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _flatten_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
        elif isinstance(value, Tensor) and value.numel() == 1:
            flat[f"{prefix}{key}"] = float(value)
    return flat


class Trainer:
    """Train a :class:`~mask2former.Mask2Former` as ``config`` describes.

    Args:
        config: the full :class:`~mask2former.config.Config` (``solver``, ``train``, ``loss``, ``data``, ``model``).
        model: a model to train (default: built from ``config.model`` with the label space's class count).
        train_dataset, val_dataset: sample-dict data sets (INTERFACES.md); default: built from ``config.data``.
        label_space: the classes; default: the data set's ``label_space`` or ``config.labels``.
        criterion: default :class:`SetCriterion` from ``config.loss``.
        evaluate_fn: ``evaluate_fn(model, val_dataset) -> dict`` of metrics, called (model in eval mode, no grad) every
            ``train.eval_period`` iterations and at the end, on rank 0 only; None = no evaluation.
        best_metric, best_mode: metric tracked for ``model_best/`` (default by ``test.task``: PQ, mIoU or AP; "max").
        device: default ``cuda:LOCAL_RANK`` if CUDA is available, else CPU.
        callbacks: :class:`Callback` objects.
        progress_bar, tensorboard: turn the tqdm bar / TensorBoard writer off.
        image_log_period: iterations between sample-prediction images in TensorBoard (default: ``checkpoint_period``).
        find_unused_parameters: for DDP; None = find out with one probe step (only when distributed).
        keep_checkpoints: how many ``checkpoint_*.pt`` to keep (0 = all).
    """

    def __init__(
        self,
        config: Config,
        model: nn.Module | None = None,
        train_dataset: Any = None,
        val_dataset: Any = None,
        label_space: Any = None,
        *,
        criterion: nn.Module | None = None,
        evaluate_fn: EvaluateFn | None = None,
        best_metric: str | None = None,
        best_mode: str = "max",
        device: str | torch.device | None = None,
        callbacks: Sequence[Callback] = (),
        progress_bar: bool = True,
        tensorboard: bool = True,
        image_log_period: int | None = None,
        find_unused_parameters: bool | None = None,
        keep_checkpoints: int = 2,
        num_workers: int | None = None,
    ) -> None:
        if best_mode not in ("max", "min"):
            raise ValueError(f"Trainer: best_mode must be 'max' or 'min', got {best_mode!r}")
        self.config = config
        self.context = dist_utils.init_distributed(device)
        self.device = self.context.device
        self.output_dir = Path(config.train.output_dir)
        self.evaluate_fn = evaluate_fn
        self.best_metric = best_metric or DEFAULT_BEST_METRIC.get(config.test.task, "PQ")
        self.best_mode = best_mode
        self.callbacks = list(callbacks)
        self.progress_bar = progress_bar
        self.use_tensorboard = tensorboard
        self.image_log_period = image_log_period if image_log_period is not None else config.train.checkpoint_period
        self.find_unused = find_unused_parameters
        self.keep_checkpoints = keep_checkpoints
        self.num_workers = config.data.num_workers if num_workers is None else num_workers

        solver = config.solver
        if solver.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"solver.precision must be fp32, bf16 or fp16, got {solver.precision!r}")
        if solver.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("solver.precision=fp16 needs a CUDA device (GradScaler); use bf16 on CPU")
        self.micro_batch_size = dist_utils.per_device_batch_size(
            solver.batch_size, self.context.world_size, solver.accumulation_steps)

        # Data and classes.
        if train_dataset is None or (val_dataset is None and evaluate_fn is not None):
            from ..train import build_datasets

            built_train, built_val, built_labels = build_datasets(config)
            train_dataset = train_dataset if train_dataset is not None else built_train
            val_dataset = val_dataset if val_dataset is not None else built_val
            label_space = label_space if label_space is not None else built_labels
        if label_space is None:
            label_space = getattr(train_dataset, "label_space", None)
        if label_space is None and config.labels is not None:
            from ..data.label_space import LabelSpace

            label_space = LabelSpace.from_dict(config.labels)
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.label_space = label_space

        # Model and loss. The model is initialised from train.seed, identically on every process.
        if model is None:
            from ..train import build_model

            seed_everything(config.train.seed)
            model = build_model(config, label_space)
        self.model = model.to(self.device)
        if criterion is None:
            from ..train import build_criterion

            criterion = build_criterion(config, self.model.num_classes if hasattr(self.model, "num_classes")
                                        else config.model.num_classes)
        self.criterion = criterion.to(self.device)
        self.optimizer = build_optimizer(self.model, solver)
        self.scheduler = build_scheduler(self.optimizer, solver)
        self.scaler = torch.amp.GradScaler("cuda") if solver.precision == "fp16" else None
        # The point-sampling / matching generator: its own stream per process, saved in checkpoints.
        self.point_generator = torch.Generator(device=self.device)
        self.point_generator.manual_seed(derive_seed(config.train.seed, 1, self.context.rank))

        self.step = 0
        self.samples_consumed = 0  # of this process's sample stream
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.best: dict[str, Any] | None = None
        self.last_metrics: dict[str, Any] | None = None
        self.last_logs: dict[str, Any] | None = None
        self.ddp_model: nn.Module = self.model
        self._writer = None
        self._metrics_file = None
        self._sampler: TrainSampler | None = None
        self._sample_for_image: tuple | None = None
        self._step_lrs: dict[str, float] = {}
        self._resume_data_state: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | int | None = None

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def is_main(self) -> bool:
        return self.context.is_main

    @property
    def max_iter(self) -> int:
        return self.config.solver.max_iter

    def _autocast(self):
        precision = self.config.solver.precision
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The full training state of this process (``checkpoint.py`` gathers the per-process RNG states)."""
        scheduler_state = self.scheduler.state_dict()
        # The schedule itself always comes from the config (None = keep the rebuilt one on load).
        scheduler_state["lr_lambdas"] = [None] * len(scheduler_state.get("lr_lambdas", []))
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": self._sampler.state_dict(self.samples_consumed) if self._sampler is not None else None,
            "best": self.best,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "config": to_dict(self.config),
            "labels": self.label_space.to_dict() if hasattr(self.label_space, "to_dict") else None,
        }

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint of the current step (rank 0 writes; every process contributes its RNG state)."""
        rng_states = dist_utils.all_gather_object(capture_rng_state(self.point_generator))
        path = None
        if self.is_main:
            state = self.state_dict()
            state["rng"] = rng_states
            path = save_training_checkpoint(state, self.output_dir, self.step, keep=self.keep_checkpoints)
            logger.info("step %d: saved %s", self.step, path)
            for callback in self.callbacks:
                callback.on_checkpoint(self, self.step, path)
        dist_utils.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state saved by :meth:`save_checkpoint` (call before training; model not yet DDP-wrapped)."""
        state = load_training_checkpoint(path)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
        saved_model = state.get("config", {}).get("model")
        if saved_model is not None and saved_model != to_dict(self.config.model):
            changed = sorted(k for k in saved_model if saved_model[k] != to_dict(self.config.model).get(k))
            raise ValueError(f"{path}: the checkpoint was trained with another model config (differs in {changed})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best = state.get("best")
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self._resume_data_state = state.get("data")
        rng = state.get("rng") or []
        if len(rng) == self.context.world_size:
            self._pending_rng = rng[self.context.rank]
        else:
            warnings.warn(f"{path}: saved with {len(rng)} processes, resuming with {self.context.world_size}; random "
                          f"streams are re-seeded, so the run is not bit-identical to an uninterrupted one",
                          RuntimeWarning, stacklevel=2)
            self._pending_rng = derive_seed(self.config.train.seed, 2, self.step, self.context.rank)
        logger.info("resumed from %s at step %d", path, self.step)

    # ----------------------------------------------------------------------------------------------- data
    def _build_loader(self, start: int) -> DataLoader:
        from ..data.collate import collate

        self._sampler = TrainSampler(len(self.train_dataset), seed=self.config.train.seed, rank=self.context.rank,
                                     world_size=self.context.world_size, shuffle=True, start=start)
        batches = torch.utils.data.BatchSampler(self._sampler, self.micro_batch_size, drop_last=False)
        # An explicit generator keeps DataLoader from drawing its base seed from the global torch RNG (which would
        # make the training random stream depend on when iterators are created).
        generator = torch.Generator().manual_seed(derive_seed(self.config.train.seed, 3, self.context.rank))
        return DataLoader(
            SeededDataset(self.train_dataset, self.config.train.seed),
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=partial(collate, size_divisibility=self.config.model.size_divisibility),
            pin_memory=self.device.type == "cuda",
            generator=generator,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )

    # ----------------------------------------------------------------------------------------------- one iteration
    def _forward_loss(self, batch: dict[str, Any], model: nn.Module) -> tuple[Tensor, dict[str, Tensor], Any]:
        images = batch["images"].to(self.device, non_blocking=True)
        padding_mask = batch["padding_mask"].to(self.device, non_blocking=True)
        targets = [remove_crowd(target, self.device) for target in batch["targets"]]
        piloting = None
        if self.config.mask_piloting.enabled:  # MP-Former: ground-truth-piloted extra queries, training only
            from .mask_piloting import build_mask_piloting

            piloting = build_mask_piloting(self.model, targets, self.config.mask_piloting, self.point_generator)
        with self._autocast():
            normalized = self.model.normalize(images, padding_mask)
            outputs = model(normalized, piloting) if piloting is not None else model(normalized)
        # The criterion computes its costs and losses in fp32 whatever the autocast state.
        losses = self.criterion(outputs, targets, generator=self.point_generator)
        total = sum(losses.values())
        return total, losses, outputs

    def train_step(self, data_iter) -> dict[str, Any]:
        """One optimiser iteration over ``accumulation_steps`` micro-batches. Returns ``{"skipped", "losses",
        "loss", "grad_norm"}`` (detached tensors)."""
        accumulation = self.config.solver.accumulation_steps
        finite_flags = []
        loss_terms: dict[str, Tensor] = {}
        total_loss = torch.zeros((), device=self.device)
        keep_outputs = self.image_log_period > 0 and (self.step + 1) % self.image_log_period == 0
        for micro in range(accumulation):
            batch = next(data_iter)
            self.samples_consumed += len(batch["images"])
            sync = micro == accumulation - 1
            no_sync = getattr(self.ddp_model, "no_sync", None)
            with (no_sync() if (no_sync is not None and not sync) else nullcontext()):
                loss, losses, outputs = self._forward_loss(batch, self.ddp_model)
                if self.scaler is not None:
                    self.scaler.scale(loss / accumulation).backward()
                else:
                    (loss / accumulation).backward()
            finite_flags.append(torch.isfinite(loss))
            total_loss = total_loss + loss.detach() / accumulation
            for key, value in losses.items():
                loss_terms[key] = loss_terms.get(key, 0) + value.detach().float() / accumulation
            if keep_outputs and micro == accumulation - 1:
                self._sample_for_image = (batch, outputs.pred_logits[0].detach().float(),
                                          outputs.pred_masks[0].detach().float())
            del outputs, loss, losses
        locally_finite = bool(torch.stack(finite_flags).all())
        skipped = dist_utils.all_reduce_any(not locally_finite, self.device)
        grad_norm = torch.tensor(float("nan"))
        if not skipped:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = clip_grad_norm(self.optimizer, self.config.solver.clip_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips by itself on inf gradients (then lowers the scale)
                self.scaler.update()
            elif not bool(torch.isfinite(grad_norm)):
                skipped = True  # the gradient norm is all-reduced, hence the same on every process
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step_lrs = lr_summary(self.optimizer)  # the lr this iteration trained with
        with warnings.catch_warnings():
            # "lr_scheduler.step() before optimizer.step()" when the first iteration was skipped: intended.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            self.scheduler.step()
        self.step += 1
        return {"skipped": skipped, "losses": loss_terms, "loss": total_loss, "grad_norm": grad_norm}

    # ----------------------------------------------------------------------------------------------- setup
    def _maybe_resume(self, resume: bool) -> None:
        self._resume_data_state = None
        self._pending_rng = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.output_dir)
        dist_utils.barrier()
        path = find_last_checkpoint(self.output_dir) if resume else None
        if resume and path is None and self.is_main:
            logger.info("resume: no checkpoint in %s, starting from scratch", self.output_dir)
        if path is not None:
            self.load_checkpoint(path)
        else:
            if not resume and self.is_main and find_last_checkpoint(self.output_dir) is not None:
                logger.warning("%s already holds checkpoints; starting from scratch (pass resume=True to continue)",
                               self.output_dir)
            self._pending_rng = derive_seed(self.config.train.seed, 4, self.context.rank)

    def _start_random_streams(self) -> None:
        """Seed (fresh run) or restore (resume) the RNGs; done last before the loop, so that whatever setup work
        draws random numbers (imports, the DDP probe) cannot shift the training streams."""
        pending = self._pending_rng
        if isinstance(pending, dict):
            restore_rng_state(pending, self.point_generator)
        else:
            seed_everything(pending)
            self.point_generator.manual_seed(derive_seed(pending, 1))
        self._pending_rng = None

    def _probe_unused_parameters(self) -> bool:
        """One forward/backward without side effects (RNG, buffers, grads restored) to see whether some parameter
        gets no gradient, which DDP must be told about."""
        from ..data.collate import collate

        sampler = TrainSampler(len(self.train_dataset), seed=self.config.train.seed, rank=self.context.rank,
                               world_size=self.context.world_size, start=self.samples_consumed)
        keys = [key for key, _ in zip(sampler, range(self.micro_batch_size))]
        dataset = SeededDataset(self.train_dataset, self.config.train.seed)
        batch = collate([dataset[key] for key in keys], size_divisibility=self.config.model.size_divisibility)
        buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        generator_state = self.point_generator.get_state()
        devices = [self.device.index] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            loss, _, _ = self._forward_loss(batch, self.model)
            loss.backward()
        unused = dist_utils.unused_parameters(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.point_generator.set_state(generator_state)
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        any_unused = dist_utils.all_reduce_any(bool(unused), self.device)
        if unused and self.is_main:
            logger.info("DDP: %d parameters get no gradient (e.g. %s); using find_unused_parameters=True",
                        len(unused), unused[0])
        return any_unused

    def _open_logs(self, start_step: int, resumed: bool) -> None:
        if not self.is_main:
            return
        save_config(self.config, self.output_dir / "config.yaml")
        metrics_path = self.output_dir / "metrics.jsonl"
        if resumed and metrics_path.exists():
            # Drop rows of iterations after the checkpoint: they are trained again.
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
        self._metrics_file = open(metrics_path, "a")
        if self.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but keep training without it
                logger.warning("tensorboard is not installed; no TensorBoard logs")
            else:
                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"),
                                             purge_step=start_step if resumed else None)

    def _close_logs(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_row(self, row: dict[str, Any]) -> None:
        if self.is_main and self._metrics_file is not None:
            self._metrics_file.write(json.dumps(_finite_or_none(row), allow_nan=False) + "\n")
            self._metrics_file.flush()

    # ----------------------------------------------------------------------------------------------- fit
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``solver.max_iter``; ``resume=True`` continues from the last checkpoint in ``output_dir``.
        Returns ``{"step", "output_dir", "checkpoint", "final_model", "best", "metrics", "losses",
        "nonfinite_steps"}``."""
        logger.setLevel(logging.INFO if self.is_main else logging.WARNING)
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
            logger.addHandler(handler)
        self._maybe_resume(resume)
        resumed = self.step > 0
        start_step = self.step
        if self._resume_data_state is not None:
            probe = TrainSampler(len(self.train_dataset), seed=self.config.train.seed, rank=self.context.rank,
                                 world_size=self.context.world_size)
            self.samples_consumed = probe.start_from_state(self._resume_data_state)
        self.model.train()
        if self.context.distributed:
            find_unused = self.find_unused if self.find_unused is not None else self._probe_unused_parameters()
            self.ddp_model = dist_utils.wrap_ddp(self.model, self.context, find_unused,
                                                 sync_batch_norm=self.config.model.backbone.norm == "SyncBN")
        loader = self._build_loader(self.samples_consumed)
        self._open_logs(start_step, resumed)
        for callback in self.callbacks:
            callback.on_train_start(self)
        if self.is_main:
            logger.info("training %s for %d iterations (from %d): global batch %d = %d per device x %d processes "
                        "x %d accumulation, precision %s, device %s", type(self.model).__name__, self.max_iter,
                        start_step, self.config.solver.batch_size, self.micro_batch_size, self.context.world_size,
                        self.config.solver.accumulation_steps, self.config.solver.precision, self.device)
        progress = None
        if self.is_main and self.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.max_iter, initial=start_step, desc="train", dynamic_ncols=True,
                            file=sys.stderr)
        last_checkpoint = None
        train_config = self.config.train
        redirect = nullcontext()
        if progress is not None:
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect = logging_redirect_tqdm(loggers=[logger])  # log lines above the bar, not through it
        try:
            redirect.__enter__()
            self._start_random_streams()
            data_iter = iter(loader)
            window: dict[str, Tensor] = {}
            window_steps = 0
            window_start, window_first_step = time.perf_counter(), self.step
            fit_start = time.perf_counter()
            while self.step < self.max_iter:
                result = self.train_step(data_iter)
                step = self.step
                if result["skipped"]:
                    self._on_nonfinite(result)
                else:
                    self.nonfinite_in_a_row = 0
                    for key, value in (("loss", result["loss"]), *result["losses"].items(),
                                       ("grad_norm", result["grad_norm"].to(self.device))):
                        window[key] = window.get(key, 0) + value
                    window_steps += 1
                logs = None
                is_last = step == self.max_iter
                if step % max(train_config.log_period, 1) == 0 or is_last or step == start_step + 1:
                    elapsed = time.perf_counter() - window_start
                    logs = self._log_step(step, window, window_steps, step - window_first_step, elapsed,
                                          time.perf_counter() - fit_start, progress)
                    window, window_steps = {}, 0
                    window_start, window_first_step = time.perf_counter(), step
                if progress is not None:
                    progress.update(1)
                if self._sample_for_image is not None:
                    self._log_sample_image(step)
                    self._sample_for_image = None
                if self.evaluate_fn is not None and self.val_dataset is not None and (
                        is_last or (train_config.eval_period > 0 and step % train_config.eval_period == 0)):
                    self.evaluate()
                if is_last or (train_config.checkpoint_period > 0 and step % train_config.checkpoint_period == 0):
                    last_checkpoint = self.save_checkpoint()
                for callback in self.callbacks:
                    callback.on_step_end(self, step, logs)
            if self.step >= self.max_iter and self.is_main:
                self._save_weights(self.output_dir / "model_final", {"step": self.step})
        finally:
            redirect.__exit__(None, None, None)
            if progress is not None:
                progress.close()
            self._close_logs()
            del loader
        result = {
            "step": self.step,
            "output_dir": str(self.output_dir),
            "checkpoint": str(last_checkpoint or find_last_checkpoint(self.output_dir) or ""),
            "final_model": str(self.output_dir / "model_final"),
            "best": self.best,
            "metrics": self.last_metrics,
            "losses": self.last_logs,
            "nonfinite_steps": self.nonfinite_total,
        }
        for callback in self.callbacks:
            callback.on_train_end(self, result)
        return result

    # ----------------------------------------------------------------------------------------------- logging
    def _on_nonfinite(self, result: dict[str, Any]) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        terms = {key: float(value) for key, value in result["losses"].items()}
        bad = sorted(key for key, value in terms.items() if not math.isfinite(value))
        limit = self.config.train.max_nonfinite_steps
        message = (f"step {self.step}: non-finite loss or gradient (terms {bad[:6] or 'gradient norm'}"
                   f"{'...' if len(bad) > 6 else ''}); update skipped ({self.nonfinite_in_a_row} in a row"
                   f"{f', limit {limit}' if limit > 0 else ''})")
        if self.is_main:
            logger.warning(message)
        self._write_row({"step": self.step, "skipped": True, "nonfinite_terms": bad,
                         "loss": float(result["loss"]) if math.isfinite(float(result["loss"])) else None,
                         "nonfinite_in_a_row": self.nonfinite_in_a_row, "time": time.time()})
        if limit > 0 and self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"the loss or gradient was non-finite for {self.nonfinite_in_a_row} iterations in a row (up to step "
                f"{self.step}; non-finite terms {bad[:6]}); stopping. Lower solver.base_lr, train in fp32, or check "
                f"the data for empty/invalid masks (train.max_nonfinite_steps={limit})")

    def _log_step(self, step: int, window: dict[str, Tensor], window_steps: int, iterations: int, elapsed: float,
                  total_elapsed: float, progress) -> dict[str, Any]:
        """Average of the finite iterations since the last log (over processes too), lr, throughput."""
        averages = {key: value / max(window_steps, 1) for key, value in window.items()}
        averaged = dist_utils.all_reduce_mean(averages, self.device) if averages else {}
        images_per_s = self.config.solver.batch_size * max(iterations, 1) / max(elapsed, 1e-9)
        logs = {"step": step, **averaged, **self._step_lrs, "images_per_s": images_per_s,
                "step_time": elapsed / max(iterations, 1), "epoch": self._sampler.position(self.samples_consumed)[0]
                if self._sampler else 0, "time": time.time(), "elapsed": total_elapsed}
        if self.scaler is not None:
            logs["loss_scale"] = float(self.scaler.get_scale())
        self.last_logs = logs
        if self.is_main:
            self._write_row(logs)
            if self._writer is not None:
                for key, value in logs.items():
                    if key not in ("step", "time") and isinstance(value, (int, float)):
                        self._writer.add_scalar(f"train/{key}", value, step)
            if progress is not None:
                progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}", lr=f"{logs['lr']:.2e}",
                                     img_s=f"{images_per_s:.1f}", refresh=False)
            logger.debug("step %d: %s", step, logs)
        return logs

    def _log_sample_image(self, step: int) -> None:
        """TensorBoard image: input | ground-truth semantic map | predicted semantic map, for the first image of
        the last micro-batch (from outputs already computed: no extra forward pass)."""
        if not self.is_main or self._writer is None:
            return
        batch, class_logits, mask_logits = self._sample_for_image
        from ..inference.postprocess import semantic_inference

        height, width = batch["image_sizes"][0]
        padded = batch["images"].shape[-2:]
        masks = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)[0]
        prediction = semantic_inference(class_logits, masks[:, :height, :width]).argmax(0).cpu()
        truth = batch["targets"][0]["semantic"][:height, :width]
        num_classes = class_logits.shape[-1] - 1
        colors = getattr(self.label_space, "colors", None)
        palette = torch.tensor(colors, dtype=torch.uint8) if colors else torch.randint(
            0, 256, (num_classes, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        palette = torch.cat([palette, torch.zeros(256 - palette.shape[0], 3, dtype=torch.uint8)])

        def paint(labels: Tensor) -> Tensor:
            return palette[labels.clamp(0, 255)].permute(2, 0, 1)

        image = batch["images"][0, :, :height, :width]
        self._writer.add_image("train/sample_prediction", torch.cat([image, paint(truth), paint(prediction)], dim=2),
                               step)

    def _save_weights(self, directory: Path, extra: dict[str, Any]) -> None:
        if hasattr(self.model, "save_pretrained"):
            atomic_save_pretrained(self.model, directory, extra)
        else:  # a foreign nn.Module: its state dict
            from .checkpoint import atomic_torch_save

            atomic_torch_save(self.model.state_dict(), directory.with_suffix(".pt"))

    # ----------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, Any] | None:
        """Run ``evaluate_fn`` on rank 0 (others wait), log the metrics, update ``model_best/``."""
        metrics = None
        if self.is_main:
            was_training = self.model.training
            self.model.eval()
            devices = [self.device.index] if self.device.type == "cuda" else []
            start = time.perf_counter()
            # Evaluation must not move the training random streams (exact resume across eval points).
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                metrics = self.evaluate_fn(self.model, self.val_dataset)
            self.model.train(was_training)
            metrics = dict(metrics.get("metrics", metrics)) if isinstance(metrics, dict) else {"value": metrics}
            flat = _flatten_numbers(metrics)
            self._write_row({"step": self.step, "eval": flat, "eval_seconds": time.perf_counter() - start,
                             "time": time.time()})
            if self._writer is not None:
                for key, value in flat.items():
                    self._writer.add_scalar(f"eval/{key}", value, self.step)
            logger.info("step %d: evaluation %s", self.step,
                        ", ".join(f"{k}={v:.4g}" for k, v in list(flat.items())[:8]))
            self._update_best(metrics)
        metrics = dist_utils.broadcast_object(metrics)
        self.best = dist_utils.broadcast_object(self.best)
        self.last_metrics = metrics
        for callback in self.callbacks:
            callback.on_evaluate(self, self.step, metrics)
        return metrics

    def _update_best(self, metrics: dict[str, Any]) -> None:
        value = lookup_metric(metrics, self.best_metric)
        if value is None:
            if not getattr(self, "_warned_best", False):
                logger.warning("best checkpoint: metric %r not among the evaluation results %s", self.best_metric,
                               sorted(_flatten_numbers(metrics))[:12])
                self._warned_best = True
            return
        better = self.best is None or (value > self.best["value"] if self.best_mode == "max"
                                       else value < self.best["value"])
        if better:
            self.best = {"metric": self.best_metric, "value": value, "step": self.step, "mode": self.best_mode}
            self._save_weights(self.output_dir / "model_best", {"best": self.best})
            logger.info("step %d: new best %s = %.4g -> %s", self.step, self.best_metric, value,
                        self.output_dir / "model_best")


__all__ = ["Callback", "NonFiniteLossError", "Trainer", "remove_crowd", "seed_everything"]
