"""Fine-tuning from the default FashionScenes model onto another label space vs the same budget from ImageNet (issue 23).

The target data set is FashionScenes relabelled into a COARSER label space, written to disk in a real format
(``mask2former.data.export.export_samples``) and read back with ``data.dataset=...`` as a user's export would be:

    things: top (T-shirt/top + Pullover + Coat + Shirt), Trouser, Dress, footwear (Sandal + Sneaker + Ankle boot), Bag
    stuff:  grass, paving (gravel + brick; the regions of one image merge into one segment)

Four names are shared with the source model (Trouser, Dress, Bag, grass: their class rows are copied), three are
new (top, footwear, paving: fresh rows). The scenes use another generator seed than the source model's training
data (``--data-seed``), val scenes come from the val split (t10k items, held-out texture halves).

Arms (same data, same iterations, same batch; PQ / AP / mIoU on the val set every 100 iterations):
- ``finetune``: ``model.weights=SOURCE`` (the default model) with the fine-tuning recipe :data:`FINETUNE_RECIPE`;
- ``finetune_frozen_backbone``: the same with ``train.freeze=[backbone]`` (not in ``run-all`` unless asked);
- ``imagenet``: the default recipe from ImageNet weights only (the default preset's start).

    python experiments/finetune.py prepare                                # write the data set (once)
    python experiments/finetune.py run --arm finetune --seed 0 --source runs/fashion_scenes/model_final
    python experiments/finetune.py run-all --source runs/fashion_scenes/model_final   # 2 seeds x 2 arms
    python experiments/finetune.py summary                                # docs/finetune.md + docs/finetune_curves.png
    python experiments/finetune.py run-all --smoke --source ...           # 10 iterations on 8 images, to check it runs

``--format`` picks the exported format (``coco-panoptic`` now; ``labelme`` / ``yolo`` once export_samples writes
them) and ``--dataset`` the reader (default: the format's). Runs are resumable (``runs/finetune/<arm>_s<seed>/``);
a finished run writes ``experiments/results/finetune/<arm>_s<seed>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import convergence  # noqa: E402 - the sibling study's run/eval/summary helpers

ROOT = HERE.parent
RESULTS_DIR = HERE / "results" / "finetune"
DOCS_DIR = ROOT / "docs"
RUNS_DIR = ROOT / "runs" / "finetune"
SEEDS = (0, 1)
MAX_ITER, EVAL_PERIOD = 400, 100
KEYS = ("PQ", "AP", "mIoU")
# coarse class -> (is thing, FashionScenes classes it merges)
COARSE: dict[str, tuple[bool, tuple[str, ...]]] = {
    "top": (True, ("T-shirt/top", "Pullover", "Coat", "Shirt")),
    "Trouser": (True, ("Trouser",)),
    "Dress": (True, ("Dress",)),
    "footwear": (True, ("Sandal", "Sneaker", "Ankle boot")),
    "Bag": (True, ("Bag",)),
    "grass": (False, ("grass",)),
    "paving": (False, ("gravel", "brick")),
}
READERS = {"coco-panoptic": "coco_panoptic", "labelme": "labelme", "yolo": "yolo"}
# The fine-tuning recipe (docs/training.md, "Fine-tuning"): a 5x lower lr than the from-ImageNet default (1e-3),
# because the decoder already works and a large first step would undo it; the rest as the default recipe.
FINETUNE_RECIPE = ["solver.base_lr=0.0002", "solver.warmup_iters=20", "solver.warmup_factor=0.01"]
ARMS: dict[str, list[str]] = {
    "finetune": ["model.weights={source}", *FINETUNE_RECIPE],
    "finetune_frozen_backbone": ["model.weights={source}", *FINETUNE_RECIPE, "train.freeze=[backbone]"],
    "imagenet": [],  # the default preset: ImageNet backbone, everything else random, lr 1e-3
}
DEFAULT_ARMS = ("finetune", "imagenet")
SMOKE = {"max_iter": 10, "eval_period": 5, "train_images": 8, "val_images": 8}


# ----- the data set --------------------------------------------------------------------------------------------


def coarse_label_space():
    from mask2former.data.label_space import LabelSpace

    names = list(COARSE)
    return LabelSpace(names=names, is_thing=[COARSE[n][0] for n in names], dataset_ids=list(range(1, len(names) + 1)))


def class_mapping(source_names: list[str]) -> list[int]:
    """Source contiguous id -> coarse contiguous id."""
    coarse = {old: index for index, (_, (_, olds)) in enumerate(COARSE.items()) for old in olds}
    missing = [name for name in source_names if name not in coarse]
    if missing:
        raise ValueError(f"the coarse label space does not place {missing}")
    return [coarse[name] for name in source_names]


def remap(sample: dict[str, Any], mapping: list[int], is_thing: list[bool]) -> dict[str, Any]:
    """A sample in the coarse label space: labels mapped, the stuff segments of one coarse class merged."""
    import torch

    lookup = torch.tensor(mapping)
    labels = lookup[sample["labels"]]
    keep_labels, keep_masks, keep_crowd = [], [], []
    stuff: dict[int, int] = {}
    for label, mask, crowd in zip(labels.tolist(), sample["masks"], sample["iscrowd"].tolist()):
        if not is_thing[label] and label in stuff:
            keep_masks[stuff[label]] = keep_masks[stuff[label]] | mask
            continue
        if not is_thing[label]:
            stuff[label] = len(keep_labels)
        keep_labels.append(label)
        keep_masks.append(mask.clone())
        keep_crowd.append(bool(crowd))
    semantic = sample["semantic"].clone()
    valid = semantic != 255
    semantic[valid] = lookup[semantic[valid]]
    height, width = sample["semantic"].shape
    return {**sample, "labels": torch.tensor(keep_labels, dtype=torch.int64),
            "masks": torch.stack(keep_masks) if keep_masks else torch.zeros(0, height, width, dtype=torch.bool),
            "iscrowd": torch.tensor(keep_crowd, dtype=torch.bool), "semantic": semantic}


def prepare(data_dir: Path, format: str, train_images: int, val_images: int, data_seed: int) -> Path:
    """Write the coarse data set (train + val) once; a marker records how it was made."""
    from mask2former.data.export import export_samples
    from mask2former.data.fashion_scenes import FashionScenes

    settings = {"format": format, "train_images": train_images, "val_images": val_images, "data_seed": data_seed}
    marker = data_dir / "prepared.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return data_dir
    space = coarse_label_space()
    for split, count in (("train", train_images), ("val", val_images)):
        scenes = FashionScenes(split=split, num_images=count, seed=data_seed, image_size=256)
        mapping = class_mapping(scenes.label_space.names)

        def samples(scenes=scenes, mapping=mapping) -> Iterator[dict[str, Any]]:
            for index in range(len(scenes)):
                yield remap(scenes[index], mapping, space.is_thing)

        export_samples(samples(), space, data_dir, format=format, split=split)
    marker.write_text(json.dumps(settings))
    print(f"wrote {train_images} train + {val_images} val scenes ({', '.join(space.names)}) as {format} to "
          f"{data_dir}", flush=True)
    return data_dir


# ----- runs ----------------------------------------------------------------------------------------------------


def run_overrides(arm: str, seed: int, source: str, data_dir: Path, dataset: str, run_dir: Path,
                  smoke: bool) -> list[str]:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    max_iter, period = (SMOKE["max_iter"], SMOKE["eval_period"]) if smoke else (MAX_ITER, EVAL_PERIOD)
    arm_overrides = [o.format(source=source) for o in ARMS[arm]]
    return [f"data.dataset={dataset}", f"data.root={data_dir}", "data.train_split=train", "data.val_split=val",
            f"train.seed={seed}", f"train.output_dir={run_dir}", f"solver.max_iter={max_iter}",
            f"train.eval_period={period}", f"train.checkpoint_period={period}", *arm_overrides]


def run_one(arm: str, seed: int, args: argparse.Namespace, force: bool = False) -> dict[str, Any]:
    from mask2former.apps.train import run_train
    from mask2former.config import load_config
    from mask2former.training.metrics_log import finite_or_none

    result_file = Path(args.results) / f"{arm}_s{seed}.json"
    if result_file.exists() and not force:
        print(f"{arm} seed {seed}: already done ({result_file})", flush=True)
        return json.loads(result_file.read_text())
    if arm.startswith("finetune") and not Path(args.source).exists():
        raise SystemExit(f"--source {args.source} does not exist (the default model: train it with "
                         f"`mask2former train` first)")
    data_dir = prepare(Path(args.data), args.format, args.train_images, args.val_images, args.data_seed)
    run_dir = Path(args.runs) / f"{arm}_s{seed}"
    overrides = run_overrides(arm, seed, args.source, data_dir, args.dataset or READERS[args.format], run_dir,
                              args.smoke)
    config = load_config("fashion_scenes_lite0", overrides)
    start = time.perf_counter()
    # the model.* keys the arm sets explicitly (only model.weights here): the architecture is the checkpoint's
    run_train(config, resume=True, explicit_model_keys=[o.split("=")[0] for o in overrides if o.startswith("model.")])
    rows = convergence.read_metrics(run_dir)
    curve, timing = convergence.curve_and_timing(rows)
    timing["last_session_seconds"] = time.perf_counter() - start
    document = {
        "arm": arm, "seed": seed, "overrides": overrides, "smoke": args.smoke, "format": args.format,
        "source": args.source if arm.startswith("finetune") else None, "max_iter": config.solver.max_iter,
        "train_images": args.train_images, "val_images": args.val_images, "data_seed": args.data_seed,
        "classes": list(COARSE), "curve": curve, "timing": timing, "machine": convergence.machine(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = result_file.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(finite_or_none(document), indent=1, allow_nan=False, default=float))
    temporary.replace(result_file)
    final = curve[-1] if curve else {}
    print(f"{arm} seed {seed}: " + ", ".join(f"{k} {convergence._fmt(final.get(k))}" for k in KEYS)
          + f" -> {result_file}", flush=True)
    return document


# ----- summary -------------------------------------------------------------------------------------------------


def load_results(directory: Path) -> dict[str, list[dict[str, Any]]]:
    results = convergence.load_results(directory)
    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in results)]
    return {arm: sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"]) for arm in arms}


def table(arms: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Per evaluated step: each arm's mean ± std over seeds, and finetune - imagenet per seed pair."""
    steps = sorted({p["step"] for runs in arms.values() for r in runs for p in r["curve"]})
    header = ["step"] + [f"{arm} {key}" for arm in arms for key in KEYS]
    paired = "finetune" in arms and "imagenet" in arms
    if paired:
        header += [f"Δ{key} (finetune − imagenet)" for key in KEYS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step in steps:
        cells = [str(step)]
        for runs in arms.values():
            for key in KEYS:
                cells.append(convergence.cell(convergence.mean_std(
                    p.get(key) for r in runs for p in r["curve"] if p["step"] == step)))
        if paired:
            for key in KEYS:
                def value(run, key=key):
                    return next((p.get(key) for p in run["curve"] if p["step"] == step), None)
                d = convergence.difference(arms["finetune"], arms["imagenet"], value)
                cells.append("-" if d["n"] == 0 else f"{d['diff']:+.1f} (seeds: "
                             + ", ".join(f"{x:+.1f}" for x in d["paired"]) + ")")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(arms: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(KEYS), figsize=(4 * len(KEYS), 3.6))
    for axis, key in zip(axes, KEYS):
        for arm, runs in arms.items():
            curve = convergence.mean_curve(runs, key)
            steps, means = [c[0] for c in curve], [c[1] for c in curve]
            stds = [0.0 if math.isnan(c[2]) else c[2] for c in curve]
            line, = axis.plot(steps, means, marker="o", markersize=3, label=f"{arm} ({len(runs)} seeds)")
            axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=line.get_color(), alpha=0.2)
        convergence._label_axis(axis, "iteration", f"{key} (val)", f"{key}: fine-tuned vs ImageNet start")
    path.parent.mkdir(parents=True, exist_ok=True)
    return convergence._save_figure(plt, figure, path)


def described(arm: str) -> str:
    return ", ".join(o.format(source="SOURCE") for o in ARMS[arm]) or "the default preset"


def summary(results: Path, docs: Path) -> Path:
    arms = load_results(results)
    if not arms:
        raise SystemExit(f"no results in {results}")
    first = next(iter(arms.values()))[0]
    curves = plot(arms, docs / "finetune_curves.png")
    lines = [
        "# Fine-tuning from the default model vs the ImageNet start (issue 23)",
        "",
        f"Written by `python experiments/finetune.py summary` from {convergence.shown_path(results)}. Target: "
        f"FashionScenes relabelled into {len(first['classes'])} coarser classes ({', '.join(first['classes'])}; "
        f"4 names shared with the source model), {first['train_images']} train / {first['val_images']} val scenes "
        f"exported as {first['format']} and read back; {first['max_iter']} iterations of batch 4, "
        f"same data and budget for every arm; mean ± std over seeds {sorted({r['seed'] for runs in arms.values() for r in runs})}.",
        "",
        "Arms: " + "; ".join(f"`{arm}`: {described(arm)}" for arm in arms),
        "",
        *table(arms),
        "",
        f"![curves]({curves.name})",
        "",
        f"Machine of the runs: {first['machine'].get('device')} / {first['machine'].get('cpu')}"
        + (" (SMOKE runs: not a result)" if any(r["smoke"] for runs in arms.values() for r in runs) else ""),
        "",
    ]
    path = docs / "finetune.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path} and {curves}", flush=True)
    return path


# ----- command line --------------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--source", default="runs/fashion_scenes/model_final", help="the model to fine-tune from")
    common.add_argument("--format", default="coco-panoptic", choices=list(READERS))
    common.add_argument("--dataset", default=None, help="data.dataset reading the export (default: the format's)")
    common.add_argument("--train-images", type=int, default=200)
    common.add_argument("--val-images", type=int, default=100)
    common.add_argument("--data-seed", type=int, default=1, help="FashionScenes seed (the default model used 0)")
    common.add_argument("--smoke", action="store_true", help=f"{SMOKE['max_iter']} iterations, "
                                                             f"{SMOKE['train_images']} images: does it run?")
    common.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    common.add_argument("--data", default=None, help="data folder (default runs/finetune[_smoke]/data)")
    common.add_argument("--runs", default=None, help="run folders (default runs/finetune[_smoke])")
    common.add_argument("--results", default=None, help="result JSONs (default experiments/results/finetune)")
    commands.add_parser("prepare", parents=[common], help="write the coarse data set")
    run = commands.add_parser("run", parents=[common], help="one arm and seed (resumable)")
    run.add_argument("--arm", required=True, choices=list(ARMS))
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--force", action="store_true", help="run again even when its result file exists")
    run_all = commands.add_parser("run-all", parents=[common], help="the missing runs, seed by seed")
    run_all.add_argument("--arms", default=",".join(DEFAULT_ARMS))
    run_all.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    summarise = commands.add_parser("summary", parents=[common], help="docs/finetune.md + docs/finetune_curves.png")
    summarise.add_argument("--docs", default=None)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.threads:  # a shared machine: OpenMP threads fighting over busy cores make every step many times slower
        import torch

        torch.set_num_threads(args.threads)
    base = ROOT / "runs" / ("finetune_smoke" if args.smoke else "finetune")
    if args.smoke:
        args.train_images, args.val_images = SMOKE["train_images"], SMOKE["val_images"]
    args.data = args.data or str(base / "data")
    args.runs = args.runs or str(base)
    args.results = args.results or str(base / "results" if args.smoke else RESULTS_DIR)
    if args.command == "prepare":
        prepare(Path(args.data), args.format, args.train_images, args.val_images, args.data_seed)
    elif args.command == "run":
        run_one(args.arm, args.seed, args, force=args.force)
    elif args.command == "run-all":
        for arm, seed in convergence.run_order(args.arms.split(","), [int(s) for s in args.seeds.split(",")]):
            run_one(arm, seed, args)
    else:
        summary(Path(args.results), Path(args.docs) if args.docs else (base / "docs" if args.smoke else DOCS_DIR))


if __name__ == "__main__":
    main()
