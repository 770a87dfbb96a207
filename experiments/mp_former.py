"""MP-Former vs Mask2Former vs a MaskFormer-style decoder on FashionScenes (project issue 6).

Arms (same preset, seed, data, steps and batch per arm; only the decoder / training differ):
- ``m2f``: Mask2Former as the preset defines it (masked attention, query positional embedding).
- ``mp_former``: + mask piloting as released (1 group, label noise 0.2, no point noise, all layers), and without the
  query positional embedding, as MP-Former's released decoder.
- ``mp_former_qpos`` (optional): mask piloting, keeping the query positional embedding (isolates piloting).
- ``m2f_no_qpos`` (optional): Mask2Former without the query positional embedding (isolates that change).
- ``maskformer_decoder``: the MaskFormer decoder (``transformer_decoder: standard``: unmasked cross-attention on
  the 1/32 encoder output, self- before cross-attention, zero content queries, dropout 0.1) on the same
  MSDeformAttn pixel decoder; the existing decoder variant, so no new switch was needed.

Each run is evaluated on the val split every ``--eval-every`` steps and at the end: PQ, mIoU, AP (evaluator.py)
and the per-layer mIoU-L / Util of ``evaluation/layer_consistency.py`` (Hungarian matching of every decoder
prediction on val). Writes ``experiments/results/mp_former.{json,md}`` and PNG plots (PQ vs steps, mIoU-L and
Util per layer). Runs go to ``--runs-dir`` (default ``runs/mp_former``: checkpoints, metrics.jsonl).

    python experiments/mp_former.py                              # full: 3 arms x 2 seeds x 1000 steps (hours on CPU)
    python experiments/mp_former.py --arms m2f mp_former mp_former_qpos maskformer_decoder --seeds 0 1 2
    python experiments/mp_former.py --smoke                      # a few steps on a few images, to check it runs
    python experiments/mp_former.py --summarise-only             # rebuild the table and plots from the JSON

Extra ``key=value`` arguments override the config of every arm (e.g. ``solver.precision=fp32``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mask2former.config import Config, load_config, to_dict
from mask2former.data.collate import collate
from mask2former.evaluation.layer_consistency import LayerConsistency, mask_predictions_from_outputs
from mask2former.train import build_criterion, build_datasets, build_evaluate_fn, build_model
from mask2former.training.criterion import prepare_targets
from mask2former.training.trainer import Callback, Trainer, remove_crowd, seed_everything

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
PRESET = "fashion_scenes_lite0"
ARMS: dict[str, list[str]] = {
    "m2f": [],
    "mp_former": ["model.query_pos=false", "mask_piloting.enabled=true"],
    "mp_former_qpos": ["mask_piloting.enabled=true"],
    "m2f_no_qpos": ["model.query_pos=false"],
    "maskformer_decoder": ["model.transformer_decoder=standard"],
}
DEFAULT_ARMS = ("m2f", "mp_former", "maskformer_decoder")
HEADLINE = ("PQ", "mIoU", "AP")


class Recorder(Callback):
    def __init__(self) -> None:
        self.evaluations: list[dict[str, Any]] = []
        self.last_logs: dict[str, Any] | None = None

    def on_step_end(self, trainer, step, logs) -> None:
        if logs is not None:
            self.last_logs = logs

    def on_evaluate(self, trainer, step, metrics) -> None:
        self.evaluations.append({"step": step, **metrics})


@torch.no_grad()
def layer_consistency(model: nn.Module, dataset: Any, matcher: nn.Module, num_classes: int, num_images: int,
                      batch_size: int = 8, size_divisibility: int = 32) -> dict[str, Any]:
    """mIoU-L / Util over the first ``num_images`` of ``dataset`` (fp32, eval mode) with the training matcher on
    every decoder prediction."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)  # matching samples points: fixed for every eval
    consistency = LayerConsistency()
    total = min(num_images, len(dataset))
    for start in range(0, total, batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, total))], size_divisibility)
        images = model.normalize(batch["images"].to(device), batch["padding_mask"].to(device))
        outputs = model(images)
        targets = prepare_targets([remove_crowd(t, device) for t in batch["targets"]], num_classes, len(images), device)
        predictions = [(a["pred_logits"], a["pred_masks"]) for a in outputs.aux_outputs]
        predictions.append((outputs.pred_logits, outputs.pred_masks))
        indices = [matcher(logits, masks, targets, generator=generator) for logits, masks in predictions]
        consistency.update(mask_predictions_from_outputs(outputs), indices)
    return consistency.compute()


def arm_config(arm: str, seed: int, args: argparse.Namespace, run_dir: Path) -> Config:
    overrides = [
        *ARMS[arm], *args.overrides,
        f"train.seed={seed}", f"train.output_dir={run_dir}", f"train.eval_period={args.eval_every}",
        "train.checkpoint_period=0", f"train.log_period={max(1, min(20, args.max_iter))}",
    ]
    if args.max_iter is not None:
        overrides.append(f"solver.max_iter={args.max_iter}")
    if args.num_train is not None:
        overrides.append(f"data.num_train_images={args.num_train}")
    if args.num_val is not None:
        overrides.append(f"data.num_val_images={args.num_val}")
    if args.batch_size is not None:
        overrides.append(f"solver.batch_size={args.batch_size}")
    return load_config(args.preset, overrides)


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.runs_dir) / arm / f"seed{seed}"
    config = arm_config(arm, seed, args, run_dir)
    train_dataset, val_dataset, label_space = build_datasets(config)
    # As run_train does: the model config records the class count and the piloting label embedding.
    config = dataclasses.replace(
        config, labels=label_space.to_dict(),
        model=dataclasses.replace(config.model, num_classes=label_space.num_classes,
                                  mask_piloting=config.mask_piloting.enabled))
    seed_everything(config.train.seed)
    model = build_model(config, label_space)
    criterion = build_criterion(config, label_space.num_classes)  # + the MP losses when piloting is on
    evaluate_metrics = build_evaluate_fn(config, label_space)

    def evaluate(model: nn.Module, dataset: Any) -> dict[str, Any]:
        metrics = dict(evaluate_metrics(model, dataset)["metrics"])
        metrics["layer_consistency"] = layer_consistency(
            model, dataset, criterion.matcher, label_space.num_classes, args.lc_images,
            size_divisibility=config.model.size_divisibility)
        return {"metrics": metrics}

    recorder = Recorder()
    trainer = Trainer(config, model, train_dataset, val_dataset, label_space, criterion=criterion,
                             evaluate_fn=evaluate, callbacks=[recorder], progress_bar=False, tensorboard=False,
                             num_workers=args.num_workers)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    final_losses = {k: v for k, v in (recorder.last_logs or {}).items() if k == "loss" or k.startswith("loss_")}
    print(f"[{arm} seed {seed}] {seconds:.0f}s; " + ", ".join(
        f"step {e['step']}: " + " ".join(f"{k}={e.get(k, math.nan):.2f}" for k in HEADLINE)
        for e in recorder.evaluations), flush=True)
    return {"arm": arm, "seed": seed, "seconds": seconds, "evaluations": recorder.evaluations,
            "final_losses": {"loss": final_losses.get("loss"),
                             "loss_mp_sum": sum(v for k, v in final_losses.items() if "_mp" in k) or None},
            "config": {"model": to_dict(config.model), "mask_piloting": to_dict(config.mask_piloting),
                       "solver": to_dict(config.solver), "data": to_dict(config.data)}}


# ----- summary -------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm and eval step: mean/std over seeds of PQ, mIoU, AP, mean mIoU-L and mean Util; per layer at the
    last step: mean mIoU-L_i and Util_i."""
    summary: dict[str, Any] = {}
    for arm in dict.fromkeys(run["arm"] for run in runs):
        arm_runs = [run for run in runs if run["arm"] == arm]
        steps = sorted({e["step"] for run in arm_runs for e in run["evaluations"]})
        by_step = {}
        for step in steps:
            rows = [e for run in arm_runs for e in run["evaluations"] if e["step"] == step]
            entry = {key: _mean_std([row.get(key, math.nan) for row in rows]) for key in HEADLINE}
            for key in ("mean_mIoU_L", "mean_Util"):
                entry[key] = _mean_std([100 * row["layer_consistency"][key] for row in rows])
            entry["seeds"] = len(rows)
            by_step[step] = entry
        last = [run["evaluations"][-1]["layer_consistency"] for run in arm_runs if run["evaluations"]]
        per_layer = {
            key: [statistics.fmean(100 * lc[key][i] for lc in last) for i in range(min(len(lc[key]) for lc in last))]
            for key in ("mIoU_L", "Util")
        } if last else {"mIoU_L": [], "Util": []}
        summary[arm] = {"by_step": by_step, "per_layer_last": per_layer,
                        "seconds": statistics.fmean(run["seconds"] for run in arm_runs), "seeds": len(arm_runs)}
    return summary


def _cell(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    return "-" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# MP-Former vs Mask2Former vs MaskFormer-style decoder (FashionScenes)", "",
        f"Preset `{meta['preset']}`, {meta['max_iter']} steps, batch {meta['batch_size']}, seeds {meta['seeds']}, "
        f"{meta['num_val']} val images "
        f"({meta.get('lc_images')} for mIoU-L / Util); mean ± std over seeds. Produced by `experiments/mp_former.py`"
        f"{' (SMOKE RUN: numbers are meaningless)' if meta['smoke'] else ''}.", "",
        "mIoU-L / Util: `evaluation/layer_consistency.py` (our reconstruction of the paper's definitions: IoU of "
        "consecutive predictions of the finally matched queries; share of objects whose matched query at a layer is "
        "the final one), on val with the training matcher.", "",
        "| arm | step | PQ | mIoU | AP | mean mIoU-L | mean Util | s/run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, result in summary.items():
        for step, entry in result["by_step"].items():
            lines.append(f"| {arm} | {step} | {_cell(entry['PQ'])} | {_cell(entry['mIoU'])} | {_cell(entry['AP'])} | "
                         f"{_cell(entry['mean_mIoU_L'])} | {_cell(entry['mean_Util'])} | {result['seconds']:.0f} |")
    lines += ["", "Per decoder prediction at the last step (mean over seeds). Prediction 0 comes from the initial queries, "
              "prediction k from layer k; the MaskFormer decoder has no prediction 0. mIoU-L_i compares predictions "
              "i and i+1; Util of the last prediction is 100 by definition.", ""]
    for key in ("mIoU_L", "Util"):
        width = max((len(r["per_layer_last"][key]) for r in summary.values()), default=0)
        lines += [f"| {key} | " + " | ".join(str(i) for i in range(width)) + " |", "|---|" + "---:|" * width]
        for arm, result in summary.items():
            values = result["per_layer_last"][key]
            cells = ["-"] * (width - len(values)) + [f"{v:.1f}" for v in values]  # align the final predictions
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm, result in summary.items():
        steps = list(result["by_step"])
        means = [result["by_step"][s]["PQ"][0] for s in steps]
        stds = [result["by_step"][s]["PQ"][1] for s in steps]
        axis.errorbar(steps, means, yerr=stds, marker="o", capsize=3, label=arm)
    axis.set_xlabel("training step")
    axis.set_ylabel("PQ (val)")
    axis.set_title("PQ vs steps (mean ± std over seeds)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = directory / "mp_former_pq_vs_steps.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(str(path))

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in ((axes[0], "mIoU_L", "mIoU-L_i (prediction i vs i+1)"), (axes[1], "Util", "Util_i")):
        width = max((len(r["per_layer_last"][key]) for r in summary.values()), default=0)
        for arm, result in summary.items():
            values = result["per_layer_last"][key]
            axis.plot(range(width - len(values), width), values, marker="o", label=arm)  # final predictions aligned
        axis.set_xlabel("decoder prediction i")
        axis.set_ylabel(f"{key} (%)")
        axis.set_title(title + ", last step")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path = directory / "mp_former_layer_consistency.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(str(path))
    return written


def write_outputs(runs: list[dict[str, Any]], meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    meta["plots"] = [Path(path).name for path in plot(summary, directory)]
    document = {"meta": meta, "summary": summary, "runs": runs}
    (directory / "mp_former.json").write_text(json.dumps(document, indent=1, default=float))
    (directory / "mp_former.md").write_text(markdown(summary, meta))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=sorted(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--preset", default=PRESET)
    parser.add_argument("--max-iter", type=int, default=None, help="default: the preset's solver.max_iter")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--lc-images", type=int, default=100, help="val images for mIoU-L / Util (a second pass)")
    parser.add_argument("--runs-dir", default=None, help="default: runs/mp_former (git-ignored)")
    parser.add_argument("--results-dir", default=None, help="default: experiments/results (smoke: the runs dir)")
    parser.add_argument("--smoke", action="store_true", help="4 steps, 16 train / 4 val images, batch 2, one seed")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every arm")
    args = parser.parse_args()
    if args.smoke:
        args.max_iter, args.eval_every, args.num_train, args.num_val, args.batch_size = 4, 2, 16, 4, 2
        args.seeds = args.seeds[:1]
    args.runs_dir = args.runs_dir or str(HERE.parent / "runs" / ("mp_former_smoke" if args.smoke else "mp_former"))
    results_dir = Path(args.results_dir or (args.runs_dir if args.smoke else RESULTS_DIR))
    if args.summarise_only:
        document = json.loads((results_dir / "mp_former.json").read_text())
        write_outputs(document["runs"], document["meta"], results_dir)
        print((results_dir / "mp_former.md").read_text())
        return
    base = load_config(args.preset, args.overrides)
    meta = {
        "preset": args.preset, "arms": args.arms, "seeds": args.seeds, "overrides": args.overrides,
        "max_iter": args.max_iter or base.solver.max_iter, "batch_size": args.batch_size or base.solver.batch_size,
        "num_val": args.num_val if args.num_val is not None else base.data.num_val_images,
        "eval_every": args.eval_every, "lc_images": min(args.lc_images, args.num_val if args.num_val is not None else base.data.num_val_images),
        "smoke": args.smoke, "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor()}", "threads": torch.get_num_threads(),
    }
    runs = []
    for seed in args.seeds:  # seeds outside, arms inside: a partial run still compares the arms
        for arm in args.arms:
            runs.append(run_arm(arm, seed, args))
            write_outputs(runs, meta, results_dir)
    print(markdown(summarise(runs), meta))


if __name__ == "__main__":
    main()
