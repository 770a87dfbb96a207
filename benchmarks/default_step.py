"""Time the default CPU recipe's training step (``fashion_scenes_lite0`` + overrides) and split it by stage.

One step = ``Trainer.train_step`` on a pre-loaded batch (forward, loss, backward, clip, AdamW), so data loading is not
counted. Prints the median of ``--steps`` steps after ``--warmup`` and, per step, the time of every stage forward and
backward (backbone, pixel decoder, transformer decoder, criterion with its matcher and importance sampling), the
gradient clip and the optimiser step. Backward stages are read from gradient hooks on each stage's outputs: a stage's
backward ends when the last gradient of the stage's inputs has arrived.

``--profile`` adds the top operators by self time (torch.profiler, forward and backward together).
``--baseline REV`` times the code of git revision ``REV`` with this same script, in alternating subprocesses
(``--rounds`` each), and prints the ratio of the medians: "old and new back to back" on a machine whose speed drifts.

    python benchmarks/default_step.py [--steps 10] [--threads 2] [--profile] [key=value ...]
    python benchmarks/default_step.py --baseline d6101fa --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("backbone", "pixel_decoder", "transformer_decoder", "criterion")


def build_trainer(overrides: list[str], total: int):
    from mask2former.config import load_config
    from mask2former.data.build import build_datasets
    from mask2former.modeling.build import build_model
    from mask2former.training.build import build_criterion
    from mask2former.training.trainer import Trainer, seed_everything

    config = load_config("fashion_scenes_lite0", overrides)
    data = dataclasses.replace(config.data, num_train_images=total * config.solver.batch_size, num_val_images=0)
    config = dataclasses.replace(config, data=data, train=dataclasses.replace(
        config.train, output_dir=tempfile.mkdtemp(prefix="default_step_")))
    train_dataset, _, label_space = build_datasets(config)
    config = dataclasses.replace(config, labels=label_space.to_dict(), model=dataclasses.replace(
        config.model, num_classes=label_space.num_classes,
        mask_piloting=config.model.mask_piloting or config.mask_piloting.enabled))
    seed_everything(0)
    model = build_model(config, label_space)
    return Trainer(config, model, train_dataset, None, label_space,
                   criterion=build_criterion(config, label_space.num_classes), evaluate_fn=None,
                   progress_bar=False, tensorboard=False)


def grad_tensors(value) -> list[torch.Tensor]:
    """Every tensor in a stage's (nested) output that will receive a gradient."""
    if isinstance(value, torch.Tensor):
        return [value] if value.requires_grad else []
    if dataclasses.is_dataclass(value):
        value = [getattr(value, field.name) for field in dataclasses.fields(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in grad_tensors(item)]
    return []


class StageClock:
    """Forward seconds per stage (wrapped ``forward``s) and backward boundaries (hooks on the stages' outputs)."""

    def __init__(self, trainer) -> None:
        from mask2former.training import criterion as criterion_module
        from mask2former.training import trainer as trainer_module

        self.seconds: dict[str, float] = collections.defaultdict(float)  # this step's
        self.per_step: dict[str, list[float]] = collections.defaultdict(list)
        self.last_grad: dict[str, float] = {}
        model = trainer.model
        for stage in STAGES[:3]:
            self.wrap(getattr(model, stage), "forward", f"forward {stage}", outputs_of=stage)
        self.wrap(trainer.criterion, "forward", "forward criterion")
        self.wrap(trainer.criterion.matcher, "forward", "forward criterion.matcher")
        self.wrap(criterion_module, "uncertain_point_coords", "forward criterion.importance_sampling")
        self.wrap(trainer_module, "clip_grad_norm", "gradient clip")
        self.wrap(trainer.optimizer, "step", "optimiser step")
        self.wrap(torch.Tensor, "backward", "backward", backward=True)

    def wrap(self, owner, name: str, label: str, outputs_of: str | None = None, backward: bool = False) -> None:
        function = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            if backward:
                self.backward_start = start
                self.last_grad.clear()
            result = function(*args, **kwargs)
            end = time.perf_counter()
            self.seconds[label] += end - start
            if backward:
                self.split_backward(end)
            if outputs_of is not None:
                for tensor in grad_tensors(result):
                    tensor.register_hook(lambda grad, stage=outputs_of: self.note_grad(stage))
            return result

        wrapper.__dict__.update(getattr(function, "__dict__", {}))  # keeps the lr scheduler's marker on step()
        setattr(owner, name, wrapper)

    def end_step(self) -> None:
        for label, value in self.seconds.items():
            self.per_step[label].append(value)
        self.seconds.clear()

    def note_grad(self, stage: str) -> None:
        self.last_grad[stage] = time.perf_counter()

    def split_backward(self, end: float) -> None:
        # Autograd runs the nodes in reverse creation order, so the stages' backwards follow one another.
        boundary = self.backward_start
        for stage, upstream in zip(reversed(STAGES), ["transformer_decoder", "pixel_decoder", "backbone", None]):
            until = self.last_grad.get(upstream, end) if upstream else end
            self.seconds[f"backward {stage}"] += max(0.0, until - boundary)
            boundary = max(boundary, until)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    from mask2former.allocator import tune_malloc

    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()
    total = args.warmup + args.steps
    trainer = build_trainer(args.overrides, total)
    clock = StageClock(trainer)
    batches = list(itertools.islice(iter(trainer._build_loader(0)), total))  # the loader never ends
    step_seconds = []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        trainer.train_step(iter([batch]))
        clock.seconds.clear() if index < args.warmup else clock.end_step()
        if index >= args.warmup:
            step_seconds.append(time.perf_counter() - start)
    print(f"overrides: {' '.join(args.overrides) or '(none)'}; malloc tuning: {malloc_tuned}; "
          f"precision {trainer.config.solver.precision}; {args.threads} threads")
    print(f"step median {statistics.median(step_seconds):.3f} s over {len(step_seconds)} "
          f"(min {min(step_seconds):.3f}, max {max(step_seconds):.3f})")
    print("medians per step:")
    for label in sorted(clock.per_step, key=lambda key: (not key.startswith("forward"), key)):
        print(f"  {label:40s} {statistics.median(clock.per_step[label]):.3f} s")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        extra = list(itertools.islice(iter(trainer._build_loader(total)), 3))
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for batch in extra:
                trainer.train_step(iter([batch]))
        print("top operators by self time, 3 steps:")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def compare(args: argparse.Namespace) -> None:
    """Alternate subprocesses of this script on the working tree's code and on ``args.baseline``'s."""
    old_tree = Path(tempfile.mkdtemp(prefix="default_step_baseline_"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
    command = [sys.executable, __file__, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), *args.overrides]
    medians: dict[str, list[float]] = {"new": [], "old": []}
    for round_index in range(args.rounds):
        for name, source in (("old", old_tree / "src"), ("new", ROOT / "src")):
            environment = dict(os.environ, PYTHONPATH=str(source))
            output = subprocess.run(command, env=environment, check=True, capture_output=True, text=True).stdout
            medians[name].append(float(re.search(r"step median ([0-9.]+) s", output).group(1)))
            print(f"round {round_index + 1} {name} ({args.baseline if name == 'old' else 'working tree'}):\n{output}")
    old, new = statistics.median(medians["old"]), statistics.median(medians["new"])
    print(f"step: old {old:.3f} s, new {new:.3f} s (medians of {args.rounds} rounds): new/old {new / old:.3f}, "
          f"{old / new:.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print the top operators (3 more steps)")
    parser.add_argument("--baseline", help="a git revision to time against, alternating processes")
    parser.add_argument("--rounds", type=int, default=3, help="processes per side with --baseline")
    args = parser.parse_args()
    if args.baseline:
        compare(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
