"""Time the default CPU recipe's training step (``fashion_scenes_lite0`` + overrides) and split its forward by stage.

One step = ``Trainer.train_step`` on a pre-loaded batch (forward, loss, backward, clip, AdamW), so data loading is not
counted. Prints the median of ``--steps`` steps after ``--warmup`` and, per step, the forward time of the backbone,
pixel decoder, transformer decoder and criterion (the criterion's matcher and importance sampling inside it); the
rest of a step is backward and the optimiser. There is no peer here: this is the tool for A/B-ing recipe and code
changes (run both variants back to back; this machine drifts ~10 % over minutes).

    python benchmarks/default_step.py [--steps 10] [--no-malloc-tuning] [key=value ...]
    python benchmarks/default_step.py mask_piloting.enabled=false loss.num_points=2048
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-malloc-tuning", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from mask2former.allocator import tune_malloc

    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()
    from mask2former.config import load_config
    from mask2former.data.build import build_datasets
    from mask2former.modeling.build import build_model
    from mask2former.training.build import build_criterion
    from mask2former.training import criterion as criterion_module
    from mask2former.training.trainer import Trainer, seed_everything

    config = load_config("fashion_scenes_lite0", args.overrides)
    total = args.warmup + args.steps
    data = dataclasses.replace(config.data, num_train_images=total * config.solver.batch_size, num_val_images=0)
    config = dataclasses.replace(config, data=data, train=dataclasses.replace(
        config.train, output_dir=tempfile.mkdtemp(prefix="default_step_")))
    train_dataset, _, label_space = build_datasets(config)
    config = dataclasses.replace(config, labels=label_space.to_dict(), model=dataclasses.replace(
        config.model, num_classes=label_space.num_classes,
        mask_piloting=config.model.mask_piloting or config.mask_piloting.enabled))
    seed_everything(0)
    model = build_model(config, label_space)
    trainer = Trainer(config, model, train_dataset, None, label_space,
                      criterion=build_criterion(config, label_space.num_classes), evaluate_fn=None,
                      progress_bar=False, tensorboard=False)

    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name: str, label: str) -> None:
        function = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            seconds[label] += time.perf_counter() - start
            return result

        setattr(owner, name, wrapper)

    timed(trainer.model.backbone, "forward", "backbone")
    timed(trainer.model.pixel_decoder, "forward", "pixel_decoder")
    timed(trainer.model.transformer_decoder, "forward", "transformer_decoder")
    timed(trainer.criterion, "forward", "criterion")
    timed(trainer.criterion.matcher, "forward", "criterion.matcher")
    timed(criterion_module, "uncertain_point_coords", "criterion.importance_sampling")

    batches = list(itertools.islice(iter(trainer._build_loader(0)), total))  # the loader never ends
    step_seconds = []
    for index, batch in enumerate(batches):
        if index == args.warmup:
            seconds.clear()
        start = time.perf_counter()
        trainer.train_step(iter([batch]))
        if index >= args.warmup:
            step_seconds.append(time.perf_counter() - start)
    print(f"overrides: {' '.join(args.overrides) or '(none)'}; malloc tuning: {malloc_tuned}")
    print(f"step median {statistics.median(step_seconds):.3f} s over {len(step_seconds)} "
          f"(min {min(step_seconds):.3f}, max {max(step_seconds):.3f})")
    for label, value in seconds.items():
        print(f"  {label:32s} {value / len(step_seconds):.3f} s per step (forward)")


if __name__ == "__main__":
    main()
