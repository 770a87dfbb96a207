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

Outputs in ``train.output_dir``: ``checkpoints/`` and exact resume (``resume.py``), ``metrics.jsonl``,
``tensorboard/`` and ``config.yaml`` (``metrics_log.py``), ``model_best/`` (``best_model.py``) and ``model_final/``
(loadable with ``Mask2Former.from_pretrained``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import Config
from ..data.collate import collate
from ..data.contracts import BatchTarget, CriterionTarget
from ..modeling.precision import autocast, resolve_precision
from . import distributed as dist_utils
from .best_model import DEFAULT_BEST_METRIC, BestModelTracker
from .callbacks import Callback
from .freeze import freeze_parts
from .metrics_log import MetricsLog, flatten_numbers
from .optim import build_optimizer, build_scheduler, clip_grad_norm, lr_summary
from .resume import atomic_save_pretrained, atomic_torch_save, find_last_checkpoint, seed_everything
from .sampler import SeededDataset, TrainSampler, build_train_loader, derive_seed
from .train_state import TrainStateMixin

logger = logging.getLogger("mask2former.train")

EvaluateFn = Callable[[nn.Module, Any], dict]


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` iterations in a row had a NaN/inf loss or gradient norm."""


def remove_crowd(target: BatchTarget, device: torch.device) -> CriterionTarget:
    """The criterion's target (``data.contracts.CriterionTarget``) from a collated target: crowd segments dropped,
    on ``device``."""
    labels, masks = target["labels"], target["masks"]
    iscrowd = target.get("iscrowd")
    if iscrowd is not None and bool(iscrowd.any()):
        keep = ~iscrowd.bool()
        labels, masks = labels[keep], masks[keep]
    return {"labels": labels.to(device, non_blocking=True), "masks": masks.to(device, non_blocking=True)}


class Trainer(TrainStateMixin):
    """Train a :class:`~mask2former.Mask2Former` as ``config`` describes.

    Args:
        config: the full :class:`~mask2former.config.Config` (``solver``, ``train``, ``loss``, ``data``, ``model``).
        model: a model to train (default: ``modeling.build.build_model`` with the label space's class count).
        train_dataset, val_dataset: data sets of ``data.contracts.Sample`` dicts; default: ``data.build``'s.
        label_space: the classes; default: the data set's ``label_space`` or ``config.labels``.
        criterion: default ``training.build.build_criterion`` (``SetCriterion`` from ``config.loss``).
        evaluate_fn: ``evaluate_fn(model, val_dataset) -> dict`` of metrics, called (model in eval mode, no grad) every
            ``train.eval_period`` iterations and at the end, on every process (``evaluate_model`` shards the data
            over them; a function without collectives repeats its work on each); None = no evaluation.
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
        self.tracker = BestModelTracker(best_metric or DEFAULT_BEST_METRIC.get(config.test.task, "PQ"), best_mode)
        self.config = config
        self.context = dist_utils.init_distributed(device)
        self.device = self.context.device
        self.output_dir = Path(config.train.output_dir)
        self.evaluate_fn = evaluate_fn
        self.callbacks = list(callbacks)
        self.log = MetricsLog(self.output_dir, self.context.is_main, tensorboard=tensorboard,
                              progress_bar=progress_bar)
        self.image_log_period = image_log_period if image_log_period is not None else config.train.checkpoint_period
        self.find_unused = find_unused_parameters
        self.keep_checkpoints = keep_checkpoints
        self.num_workers = config.data.num_workers if num_workers is None else num_workers

        solver = config.solver
        if solver.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"solver.precision must be auto, fp32, bf16 or fp16, got {solver.precision!r}")
        self.precision_note = " (auto: bf16 where native)" if solver.precision == "auto" else ""
        solver.precision = resolve_precision(solver.precision, self.device)  # once: checkpoints record what ran
        if solver.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("solver.precision=fp16 needs a CUDA device (GradScaler); use bf16 on CPU")
        self.micro_batch_size = dist_utils.per_device_batch_size(
            solver.batch_size, self.context.world_size, solver.accumulation_steps)

        # Data and classes: the parts not given are built from the config by the builders beside them.
        if train_dataset is None or (val_dataset is None and evaluate_fn is not None):
            from ..data.build import build_datasets

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
            from ..modeling.build import build_model

            seed_everything(config.train.seed)
            model = build_model(config, label_space)
        self.model = model.to(self.device)
        if config.train.freeze:  # before the optimiser, which then holds only the parts that train
            self.freeze_report = freeze_parts(self.model, config.train.freeze)
        if criterion is None:
            from .build import build_criterion

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
        self.last_metrics: dict[str, Any] | None = None
        self.last_logs: dict[str, Any] | None = None
        self.ddp_model: nn.Module = self.model
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

    @property
    def best(self) -> dict[str, Any] | None:
        """``{"metric", "value", "step", "mode"}`` of the best evaluation so far (see ``best_model.py``)."""
        return self.tracker.best

    @best.setter
    def best(self, value: dict[str, Any] | None) -> None:
        self.tracker.best = value

    # ----------------------------------------------------------------------------------------------- data
    def _make_sampler(self, start: int = 0) -> TrainSampler:
        """This process's sample stream from ``start`` (the one place the training order is defined)."""
        return TrainSampler(len(self.train_dataset), seed=self.config.train.seed, rank=self.context.rank,
                            world_size=self.context.world_size, shuffle=True, start=start)

    def _build_loader(self, start: int) -> DataLoader:
        self._sampler = self._make_sampler(start)
        return build_train_loader(self.train_dataset, self._sampler, self.micro_batch_size, self.num_workers,
                                  self.config.model.size_divisibility, pin_memory=self.device.type == "cuda")

    def _probe_unused_parameters(self) -> bool:
        """Whether some parameter gets no gradient (DDP must be told), from one side-effect-free step."""
        sampler = self._make_sampler(self.samples_consumed)
        keys = [key for key, _ in zip(sampler, range(self.micro_batch_size))]
        dataset = SeededDataset(self.train_dataset, self.config.train.seed)
        batch = collate([dataset[key] for key in keys], size_divisibility=self.config.model.size_divisibility)
        generator_state = self.point_generator.get_state()
        unused = dist_utils.probe_unused_parameters(self.model, lambda: self._forward_loss(batch, self.model)[0],
                                                    self.device)
        self.point_generator.set_state(generator_state)
        any_unused = dist_utils.all_reduce_any(bool(unused), self.device)
        if unused and self.is_main:
            logger.info("DDP: %d parameters get no gradient (e.g. %s); using find_unused_parameters=True",
                        len(unused), unused[0])
        return any_unused

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
            self.samples_consumed = self._make_sampler().start_from_state(self._resume_data_state)
        self.model.train()
        if self.context.distributed:
            find_unused = self.find_unused if self.find_unused is not None else self._probe_unused_parameters()
            self.ddp_model = dist_utils.wrap_ddp(self.model, self.context, find_unused,
                                                 sync_batch_norm=self.config.model.backbone.norm == "SyncBN")
        loader = self._build_loader(self.samples_consumed)
        self.log.open(self.config, start_step, resumed)
        for callback in self.callbacks:
            callback.on_train_start(self)
        if self.is_main:
            logger.info("training %s for %d iterations (from %d): global batch %d = %d per device x %d processes "
                        "x %d accumulation, precision %s%s, device %s", type(self.model).__name__, self.max_iter,
                        start_step, self.config.solver.batch_size, self.micro_batch_size, self.context.world_size,
                        self.config.solver.accumulation_steps, self.config.solver.precision, self.precision_note,
                        self.device)
        last_checkpoint = None
        train_config = self.config.train
        try:
            self.log.open_progress_bar(self.max_iter, start_step)
            self._start_random_streams()
            data_iter = iter(loader)
            self.log.start_clock(self.step)
            while self.step < self.max_iter:
                result = self.train_step(data_iter)
                step = self.step
                if result["skipped"]:
                    self._on_nonfinite(result)
                else:
                    self.nonfinite_in_a_row = 0
                    self.log.add_step(result, self.device)
                logs = None
                is_last = step == self.max_iter
                if step % max(train_config.log_period, 1) == 0 or is_last or step == start_step + 1:
                    logs = self._log_step(step)
                self.log.advance()
                if self._sample_for_image is not None:
                    batch, class_logits, mask_logits = self._sample_for_image
                    self.log.add_sample_prediction(step, batch, class_logits, mask_logits,
                                                   getattr(self.label_space, "colors", None))
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
            self.log.close()
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

    def _log_step(self, step: int) -> dict[str, Any]:
        epoch = self._sampler.position(self.samples_consumed)[0] if self._sampler else 0
        after = {"loss_scale": float(self.scaler.get_scale())} if self.scaler is not None else {}
        self.last_logs = self.log.log_window(step, self.config.solver.batch_size, self.device, self._step_lrs,
                                             epoch, after)
        return self.last_logs

    # ----------------------------------------------------------------------------------------------- one iteration
    def _forward_loss(self, batch: dict[str, Any], model: nn.Module) -> tuple[Tensor, dict[str, Tensor], Any]:
        images = batch["images"].to(self.device, non_blocking=True)
        padding_mask = batch["padding_mask"].to(self.device, non_blocking=True)
        targets = [remove_crowd(target, self.device) for target in batch["targets"]]
        piloting = None
        if self.config.mask_piloting.enabled:  # MP-Former: ground-truth-piloted extra queries, training only
            from .mask_piloting import build_mask_piloting

            piloting = build_mask_piloting(self.model, targets, self.config.mask_piloting, self.point_generator)
        with autocast(self.config.solver.precision, self.device.type):
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
        self.log.write_row({"step": self.step, "skipped": True, "nonfinite_terms": bad,
                            "loss": float(result["loss"]) if math.isfinite(float(result["loss"])) else None,
                            "nonfinite_in_a_row": self.nonfinite_in_a_row, "time": time.time()})
        if limit > 0 and self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"the loss or gradient was non-finite for {self.nonfinite_in_a_row} iterations in a row (up to step "
                f"{self.step}; non-finite terms {bad[:6]}); stopping. Lower solver.base_lr, train in fp32, or check "
                f"the data for empty/invalid masks (train.max_nonfinite_steps={limit})")

    # ----------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, Any] | None:
        """Run ``evaluate_fn`` on every process (see the class doc), log rank 0's metrics, update ``model_best/``."""
        was_training = self.model.training
        self.model.eval()
        devices = [self.device.index] if self.device.type == "cuda" else []
        start = time.perf_counter()
        # Evaluation must not move the training random streams (exact resume across eval points).
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            metrics = self.evaluate_fn(self.model, self.val_dataset)
        self.model.train(was_training)
        metrics = None if not self.is_main else (
            dict(metrics.get("metrics", metrics)) if isinstance(metrics, dict) else {"value": metrics})
        if self.is_main:
            flat = flatten_numbers(metrics)
            self.log.write_row({"step": self.step, "eval": flat, "eval_seconds": time.perf_counter() - start,
                                "time": time.time()})
            self.log.add_scalars("eval", flat, self.step)
            logger.info("step %d: evaluation %s", self.step,
                        ", ".join(f"{k}={v:.4g}" for k, v in list(flat.items())[:8]))
            self.tracker.update(metrics, self.step, self._save_best)
        metrics = dist_utils.broadcast_object(metrics)
        self.best = dist_utils.broadcast_object(self.best)
        self.last_metrics = metrics
        for callback in self.callbacks:
            callback.on_evaluate(self, self.step, metrics)
        return metrics

    def _save_best(self, best: dict[str, Any]) -> None:
        self._save_weights(self.output_dir / "model_best", {"best": best})
        logger.info("step %d: new best %s = %.4g -> %s", self.step, best["metric"], best["value"],
                    self.output_dir / "model_best")

    def _save_weights(self, directory: Path, extra: dict[str, Any]) -> None:
        if hasattr(self.model, "save_pretrained"):
            atomic_save_pretrained(self.model, directory, extra)
        else:  # a foreign nn.Module: its state dict
            atomic_torch_save(self.model.state_dict(), directory.with_suffix(".pt"))


__all__ = ["Callback", "NonFiniteLossError", "Trainer", "remove_crowd", "seed_everything"]
