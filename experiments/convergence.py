"""Convergence of Mask2Former, mask piloting, MP-Former and a MaskFormer-style decoder on the default recipe (issue 19).

Arms (the default FashionScenes recipe, 1,100 iterations of batch 4, same data, same budget; only the decoder and
its training differ):

- ``m2f``: Mask2Former (``fashion_scenes_lite0`` with ``mask_piloting.enabled=false``).
- ``m2f_piloting``: the default preset as it is: Mask2Former's decoder trained with mask piloting (the "hybrid").
- ``mp_former``: MP-Former as released, the preset ``fashion_scenes_mpformer`` (piloting, no query positional
  embedding).
- ``maskformer_decoder``: the MaskFormer decoder (``model.transformer_decoder=standard``: plain cross-attention on
  the 1/32 map), on the same MSDeformAttn pixel decoder, piloting off.
- ``m2f_no_qpos`` (extra, not in ``run-all``): Mask2Former without the query positional embedding.

Each run evaluates on the full val split (200 images, fp32 as ``mask2former evaluate``) every 100 iterations and at
the end computes mIoU-L_i and Util_i per decoder prediction (``evaluation/layer_consistency.py``). One run per
command, resumable (checkpoints every 100 iterations in ``runs/convergence/<arm>_s<seed>/``); a finished run writes
``experiments/results/convergence/<arm>_s<seed>.json`` (committed: ``runs/`` is not kept).

    python experiments/convergence.py run --arm m2f --seed 0     # one run (continues from its last checkpoint)
    python experiments/convergence.py run-all                    # the missing runs, seed 0 of every arm first
    python experiments/convergence.py status                     # done / in progress / missing, CPU time left
    python experiments/convergence.py summarise                  # docs/convergence.md and docs/convergence_*.png
    python experiments/convergence.py calibrate                  # smoke runs of every arm -> seconds per iteration
                                                                 # and per evaluation (calibration.json)
    python experiments/convergence.py run-all --smoke            # a few steps on a few images, to check it runs

The earlier 150-step study (``experiments/results/mp_former.md``, 2 seeds) came from ``experiments/mp_former.py``
(commit 2828a84), which this script replaces; its arm ``m2f`` had no piloting, as ``m2f`` here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results" / "convergence"
DOCS_DIR = ROOT / "docs"
CALIBRATION = RESULTS_DIR / "calibration.json"
SEEDS = (0, 1, 2)
EVAL_PERIOD = 100
# arm -> (preset, overrides). mp_former is the preset itself, so that "as released" follows it.
ARMS: dict[str, tuple[str, list[str]]] = {
    "m2f": ("fashion_scenes_lite0", ["mask_piloting.enabled=false"]),
    "m2f_piloting": ("fashion_scenes_lite0", []),
    "mp_former": ("fashion_scenes_mpformer", []),
    "maskformer_decoder": ("fashion_scenes_lite0", ["model.transformer_decoder=standard", "mask_piloting.enabled=false"]),
    "m2f_no_qpos": ("fashion_scenes_lite0", ["model.query_pos=false", "mask_piloting.enabled=false"]),
}
DEFAULT_ARMS = ("m2f", "m2f_piloting", "mp_former", "maskformer_decoder")
CURVE_KEYS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")
PLOTTED = ("PQ", "PQ_th", "AP", "mIoU")
PQ_TARGETS = (50.0, 55.0)
# Smoke: real image size and batch (so seconds per iteration are the real ones), few steps and images.
SMOKE_ITERS, SMOKE_EVAL_PERIOD, SMOKE_VAL = 12, 6, 8
SMOKE_OVERRIDES = [f"solver.max_iter={SMOKE_ITERS}", f"train.eval_period={SMOKE_EVAL_PERIOD}",
                   f"train.checkpoint_period={SMOKE_EVAL_PERIOD}", "train.log_period=1",
                   "data.num_train_images=64", f"data.num_val_images={SMOKE_VAL}"]
READING_START, READING_END = "<!-- reading: kept by summarise -->", "<!-- end of reading -->"


class Paths:
    """Where runs, result files and the summary go (smoke: everything under runs/convergence_smoke/)."""

    def __init__(self, smoke: bool, runs_dir: str | None = None, results_dir: str | None = None,
                 docs_dir: str | None = None) -> None:
        self.smoke = smoke
        base = ROOT / "runs" / ("convergence_smoke" if smoke else "convergence")
        self.runs = Path(runs_dir) if runs_dir else base
        self.results = Path(results_dir) if results_dir else (base / "results" if smoke else RESULTS_DIR)
        self.docs = Path(docs_dir) if docs_dir else (base / "docs" if smoke else DOCS_DIR)

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.runs / f"{arm}_s{seed}"

    def result_file(self, arm: str, seed: int) -> Path:
        return self.results / f"{arm}_s{seed}.json"


# ----- configs and runs ----------------------------------------------------------------------------------------


def arm_overrides(arm: str, seed: int, run_dir: Path, smoke: bool, extra: Iterable[str] = ()) -> list[str]:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    return [*ARMS[arm][1], f"train.seed={seed}", f"train.output_dir={run_dir}", f"train.eval_period={EVAL_PERIOD}",
            f"train.checkpoint_period={EVAL_PERIOD}", *(SMOKE_OVERRIDES if smoke else []), *extra]


def arm_config(arm: str, seed: int, run_dir: Path, smoke: bool = False, extra: Iterable[str] = ()):
    from mask2former.config import load_config

    return load_config(ARMS[arm][0], arm_overrides(arm, seed, run_dir, smoke, extra))


def run_order(arms: Iterable[str], seeds: Iterable[int]) -> list[tuple[str, int]]:
    """Seed first (seed 0 of every arm, then seed 1, ...): partial results stay balanced across arms."""
    return [(arm, seed) for seed in seeds for arm in arms]


def layer_consistency(model: Any, dataset: Any, matcher: Any, num_classes: int, batch_size: int = 8,
                      size_divisibility: int = 32) -> dict[str, Any]:
    """mIoU-L / Util on ``dataset`` (fp32, eval mode), every decoder prediction matched with the training matcher."""
    import torch
    from tqdm.auto import tqdm

    from mask2former.data.collate import collate
    from mask2former.evaluation.layer_consistency import (
        LayerConsistency,
        mask_predictions_from_outputs,
    )
    from mask2former.training.criterion import prepare_targets
    from mask2former.training.trainer import remove_crowd

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)  # matching samples points: fixed for every run
    consistency = LayerConsistency()
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(dataset), batch_size), desc="layer consistency", dynamic_ncols=True):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                            size_divisibility)
            images = model.normalize(batch["images"].to(device), batch["padding_mask"].to(device))
            outputs = model(images)
            targets = prepare_targets([remove_crowd(t, device) for t in batch["targets"]], num_classes, len(images),
                                      device)
            predictions = [(a["pred_logits"], a["pred_masks"]) for a in outputs.aux_outputs]
            predictions.append((outputs.pred_logits, outputs.pred_masks))
            indices = [matcher(logits, masks, targets, generator=generator) for logits, masks in predictions]
            consistency.update(mask_predictions_from_outputs(outputs), indices)
    return consistency.compute()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def curve_and_timing(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The evaluation curve and the run's seconds from ``metrics.jsonl`` rows (over every session of a resumed run).

    A log row's ``step_time`` x iterations is the wall time of its window, which also holds any evaluation and
    checkpoint done at the window's first step; the final evaluation comes after the last log row."""
    evaluations = {row["step"]: row for row in rows if "eval" in row}  # the last row of a step wins
    curve = [{"step": step, **{k: row["eval"].get(k) for k in CURVE_KEYS}, "eval_seconds": row.get("eval_seconds")}
             for step, row in sorted(evaluations.items())]
    windows, previous = 0.0, 0
    for row in rows:
        if row.get("step_time") is not None:
            windows += row["step_time"] * (row["step"] - previous)
            previous = row["step"]
    eval_seconds = [row.get("eval_seconds") or 0.0 for row in evaluations.values()]
    inside = sum(row.get("eval_seconds") or 0.0 for step, row in evaluations.items() if step < previous)
    final = sum(row.get("eval_seconds") or 0.0 for step, row in evaluations.items() if step >= previous)
    train_seconds = windows - inside
    return curve, {
        "train_seconds": train_seconds, "eval_seconds": sum(eval_seconds), "loop_seconds": windows + final,
        "seconds_per_iteration": train_seconds / max(previous, 1),
        "seconds_per_evaluation": statistics.fmean(eval_seconds) if eval_seconds else math.nan,
    }


def clean_step_time(rows: list[dict[str, Any]]) -> float:
    """The fastest log window of one iteration that holds no evaluation or checkpoint and is not the first of a
    session (smoke runs log every iteration): the one least disturbed by other processes on a shared machine."""
    busy = {row["step"] for row in rows if "eval" in row}
    times, previous = [], None
    for row in rows:
        if row.get("step_time") is None:
            continue
        if previous is not None and row["step"] - previous == 1 and previous not in busy and previous > 1:
            times.append(row["step_time"])
        previous = row["step"]
    return min(times) if times else math.nan


def machine() -> dict[str, Any]:
    import torch

    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model_name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def run_one(arm: str, seed: int, paths: Paths, extra: Iterable[str] = (), force: bool = False) -> dict[str, Any]:
    """Train (or continue) one arm and seed, then measure layer consistency and write its result file."""
    from mask2former.apps.train import run_train
    from mask2former.config import to_dict
    from mask2former.data.build import build_datasets
    from mask2former.modeling.model import Mask2Former
    from mask2former.training.build import build_criterion
    from mask2former.training.metrics_log import finite_or_none

    result_file = paths.result_file(arm, seed)
    if result_file.exists() and not force:
        print(f"{arm} seed {seed}: already done ({result_file})", flush=True)
        return json.loads(result_file.read_text())
    run_dir = paths.run_dir(arm, seed)
    config = arm_config(arm, seed, run_dir, paths.smoke, extra)
    load_before = machine().get("load_average_1min")
    start = time.perf_counter()
    trained = run_train(config, resume=True)
    train_call_seconds = time.perf_counter() - start

    _, val_dataset, label_space = build_datasets(config)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=label_space.num_classes))
    model = Mask2Former.from_pretrained(trained["final_model"]).to(trained_device())
    matcher = build_criterion(config, label_space.num_classes).matcher
    lc_start = time.perf_counter()
    consistency = layer_consistency(model, val_dataset, matcher, label_space.num_classes,
                                    size_divisibility=config.model.size_divisibility)
    lc_seconds = time.perf_counter() - lc_start

    rows = read_metrics(run_dir)
    curve, timing = curve_and_timing(rows)
    timing.update(layer_consistency_seconds=lc_seconds,
                  wall_seconds=timing["loop_seconds"] + lc_seconds,
                  last_session_seconds=time.perf_counter() - start, last_session_train_call_seconds=train_call_seconds)
    if paths.smoke:
        timing["clean_seconds_per_iteration"] = clean_step_time(rows)
    final = curve[-1] if curve else {}
    document = {
        "arm": arm, "seed": seed, "preset": ARMS[arm][0], "overrides": ARMS[arm][1], "extra_overrides": list(extra),
        "smoke": paths.smoke, "max_iter": config.solver.max_iter, "eval_period": config.train.eval_period,
        "num_val_images": len(val_dataset), "batch_size": config.solver.batch_size,
        "curve": curve, "final": {k: final.get(k) for k in CURVE_KEYS},
        "final_all": next((row["eval"] for row in reversed(rows) if "eval" in row), {}),
        "layer_consistency": consistency,
        "timing": timing, "machine": {**machine(), "load_average_1min_at_start": load_before},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {k: to_dict(config.model)[k] for k in ("transformer_decoder", "query_pos")},
        "mask_piloting": to_dict(config.mask_piloting),
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = result_file.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(finite_or_none(document), indent=1, allow_nan=False, default=float))
    temporary.replace(result_file)
    print(f"{arm} seed {seed}: PQ {_fmt(final.get('PQ'))} PQ_th {_fmt(final.get('PQ_th'))} AP {_fmt(final.get('AP'))} "
          f"mIoU {_fmt(final.get('mIoU'))}; {timing['wall_seconds'] / 60:.1f} min -> {result_file}", flush=True)
    return document


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


# ----- status and estimates ------------------------------------------------------------------------------------


def trained_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # where the Trainer trained


def load_results(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*_s*.json"))]


def checkpoint_step(run_dir: Path) -> int:
    from mask2former.training.resume import find_last_checkpoint

    path = find_last_checkpoint(run_dir)
    match = re.search(r"checkpoint_(\d+)\.pt$", path.name) if path else None
    return int(match.group(1)) if match else 0


def per_run_estimates(results: list[dict[str, Any]], calibration: dict[str, Any] | None, max_iter: int,
                      num_val: int, eval_period: int = EVAL_PERIOD) -> dict[str, tuple[float, str]]:
    """Seconds per full run for each arm: the mean of its finished runs, else from the calibration's rates."""
    estimates: dict[str, tuple[float, str]] = {}
    for arm in ARMS:
        walls = [r["timing"]["wall_seconds"] for r in results if r["arm"] == arm and not r.get("smoke")]
        if walls:
            estimates[arm] = (statistics.fmean(walls), f"mean of {len(walls)} finished run(s)")
        elif calibration and arm in calibration.get("arms", {}):
            rates = calibration["arms"][arm]
            evaluations = max_iter // eval_period + (max_iter % eval_period != 0)
            seconds = (rates["overhead_seconds"] + max_iter * rates["seconds_per_iteration"]
                       + evaluations * num_val * rates["eval_seconds_per_image"]
                       + num_val * rates["layer_consistency_seconds_per_image"])
            estimates[arm] = (seconds, "calibration")
    return estimates


def shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def status_lines(paths: Paths, arms: Iterable[str] = DEFAULT_ARMS, seeds: Iterable[int] = SEEDS) -> list[str]:
    from mask2former.config import load_config

    base = load_config(ARMS["m2f"][0], SMOKE_OVERRIDES if paths.smoke else [])
    max_iter, num_val, period = base.solver.max_iter, base.data.num_val_images, base.train.eval_period
    results = load_results(paths.results)
    done = {(r["arm"], r["seed"]) for r in results}
    calibration = json.loads(CALIBRATION.read_text()) if CALIBRATION.exists() else None
    estimates = per_run_estimates(results, calibration, max_iter, num_val, period or EVAL_PERIOD)
    seeds = list(seeds)
    lines = [(f"convergence runs: {max_iter} iterations, evaluation every {period or EVAL_PERIOD} on {num_val} val images; "
             f"results in {shown_path(paths.results)}"), f"{'arm':<20}" + "".join(f"{'seed ' + str(s):<14}" for s in seeds)]
    left, total, unknown = 0.0, 0.0, []
    for arm in arms:
        cells = []
        seconds = estimates.get(arm, (math.nan, ""))[0]
        for seed in seeds:
            total += seconds
            if (arm, seed) in done:
                cells.append("done")
                continue
            step = checkpoint_step(paths.run_dir(arm, seed))
            cells.append(f"at step {step}" if step else "missing")
            left += seconds * (1 - step / max_iter)
            if math.isnan(seconds):
                unknown.append(arm)
        lines.append(f"{arm:<20}" + "".join(f"{cell:<14}" for cell in cells))
    lines.append("per run: " + "; ".join(f"{arm} {estimates[arm][0] / 60:.1f} min ({estimates[arm][1]})"
                                         for arm in arms if arm in estimates))
    if calibration:
        lines.append(f"calibration ({calibration['date']}, load {calibration['machine'].get('load_average_1min')}): "
                     + "; ".join(f"{arm} {r['seconds_per_iteration']:.3f} s/iteration, "
                                 f"{r['eval_seconds_per_image'] * num_val:.1f} s/evaluation"
                                 for arm, r in calibration["arms"].items() if arm in arms))
        lines += [f"  {arm}: {r['source']}" for arm, r in calibration["arms"].items() if arm in arms and "source" in r]
    if unknown:
        lines.append(f"no estimate for {sorted(set(unknown))}: run `python experiments/convergence.py calibrate`")
    else:
        lines.append(f"estimated CPU time: all {len(list(arms)) * len(seeds)} runs {total / 3600:.1f} h; "
                     f"left {left / 3600:.1f} h ({len(list(arms)) * len(seeds) - len(done & set(run_order(arms, seeds)))}"
                     f" runs not finished)")
    return lines


REFERENCE_RUNS = {"m2f_piloting": "fashion_scenes", "mp_former": "fashion_scenes_mpformer"}  # runs/<name>


def reference_rates(arm: str, reference: Path) -> dict[str, float] | None:
    """Seconds per iteration and per val image of a full run in ``reference`` (e.g. ``mask2former train --config
    fashion_scenes_lite0``), when it exists and trained ``arm``'s recipe."""
    from mask2former.config import load_config

    if not (reference / "metrics.jsonl").exists() or not (reference / "config.yaml").exists():
        return None
    saved = load_config(reference / "config.yaml")
    ours = arm_config(arm, 0, reference)
    ours = dataclasses.replace(ours, model=dataclasses.replace(  # as run_train records it
        ours.model, mask_piloting=ours.model.mask_piloting or ours.mask_piloting.enabled))
    if any(getattr(saved, part) != getattr(ours, part) for part in ("model", "loss", "mask_piloting", "solver")) \
            or saved.data.num_val_images != ours.data.num_val_images:
        print(f"calibration: {reference} trained another recipe than {arm}; not used", flush=True)
        return None
    _, timing = curve_and_timing(read_metrics(reference))
    return {"seconds_per_iteration": timing["seconds_per_iteration"],
            "eval_seconds_per_image": timing["seconds_per_evaluation"] / saved.data.num_val_images}


def anchored(rates: dict[str, dict[str, float]], runs_root: Path | None) -> dict[str, dict[str, float]]:
    """Smoke rates, replaced by a full run's where ``runs_root/<REFERENCE_RUNS[arm]>`` holds one of the same recipe,
    and for the other arms scaled by the median reference/smoke ratio: on a shared machine the smoke runs' times
    swing with the load (one 12-iteration run is a few minutes), a full run averages it out."""
    references = {arm: reference_rates(arm, runs_root / name) for arm, name in REFERENCE_RUNS.items()
                  if runs_root is not None and arm in rates}
    references = {arm: r for arm, r in references.items() if r is not None}
    if not references:
        return rates
    scale = {key: statistics.median(r[key] / rates[arm][key] for arm, r in references.items())
             for key in ("seconds_per_iteration", "eval_seconds_per_image")}
    out = {}
    for arm, r in rates.items():
        if arm in references:
            out[arm] = {**r, **references[arm], "source": f"full run runs/{REFERENCE_RUNS[arm]}"}
        else:
            out[arm] = {"seconds_per_iteration": r["seconds_per_iteration"] * scale["seconds_per_iteration"],
                        "eval_seconds_per_image": r["eval_seconds_per_image"] * scale["eval_seconds_per_image"],
                        "source": f"smoke run x {scale['seconds_per_iteration']:.2f} per iteration, "
                                  f"x {scale['eval_seconds_per_image']:.2f} per evaluation (reference / smoke of "
                                  f"{', '.join(references)})"}
        out[arm]["layer_consistency_seconds_per_image"] = r["layer_consistency_seconds_per_image"] * scale[
            "eval_seconds_per_image"]
        out[arm]["overhead_seconds"] = r["overhead_seconds"] * scale["seconds_per_iteration"]
    return out


def smoke_rates(document: dict[str, Any]) -> dict[str, float]:
    """Rates of a smoke run: the fastest clean iteration and evaluation (the least disturbed by other processes)."""
    timing, images = document["timing"], document["num_val_images"]
    accounted = timing["loop_seconds"] + timing["layer_consistency_seconds"]
    return {
        "seconds_per_iteration": timing["clean_seconds_per_iteration"],
        "eval_seconds_per_image": min(p["eval_seconds"] for p in document["curve"]) / images,
        "layer_consistency_seconds_per_image": timing["layer_consistency_seconds"] / images,
        # start-up, the final weights and overlays, re-reading the val split for mIoU-L
        "overhead_seconds": max(timing["last_session_seconds"] - accounted, 0.0),
    }


def calibrate(arms: Iterable[str] = DEFAULT_ARMS, runs_root: Path | None = ROOT / "runs",
              reuse: bool = False) -> dict[str, Any]:
    """Fresh smoke runs of ``arms`` (``reuse``: none), then the rates of every default arm's smoke run (anchored on
    full runs, see ``anchored``), written to ``calibration.json`` (committed)."""
    import shutil

    smoke = Paths(True)
    for arm in ([] if reuse else arms):
        shutil.rmtree(smoke.run_dir(arm, 0), ignore_errors=True)
        smoke.result_file(arm, 0).unlink(missing_ok=True)
        run_one(arm, 0, smoke)
    documents = {arm: json.loads(smoke.result_file(arm, 0).read_text()) for arm in DEFAULT_ARMS
                 if smoke.result_file(arm, 0).exists()}
    for document in documents.values():  # recomputed from the run folder: the rule may be newer than the file
        if smoke.run_dir(document["arm"], 0).exists():
            document["timing"]["clean_seconds_per_iteration"] = clean_step_time(
                read_metrics(smoke.run_dir(document["arm"], 0)))
    rates = {arm: smoke_rates(document) for arm, document in documents.items()}
    calibration = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": {**machine(), "smoke_load_average_1min": {
                       arm: d["machine"].get("load_average_1min") for arm, d in documents.items()}},
                   "smoke": {"iterations": SMOKE_ITERS, "val_images": SMOKE_VAL}, "smoke_rates": rates,
                   "arms": anchored(rates, runs_root)}
    CALIBRATION.parent.mkdir(parents=True, exist_ok=True)
    CALIBRATION.write_text(json.dumps(calibration, indent=1))
    return calibration


# ----- summary -------------------------------------------------------------------------------------------------


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan), len(values)


def cell(stats: tuple[float, float, int], digits: int = 1) -> str:
    mean, std, n = stats
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def steps_to(curve: list[dict[str, Any]], target: float, key: str = "PQ") -> int | None:
    """The first evaluated step with ``key >= target`` (None: never within the run)."""
    return next((point["step"] for point in curve if point.get(key) is not None and point[key] >= target), None)


def by_arm(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    return {arm: sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"]) for arm in arms}


def mean_curve(runs: list[dict[str, Any]], key: str) -> list[tuple[int, float, float, int]]:
    steps = sorted({p["step"] for r in runs for p in r["curve"]})
    out = []
    for step in steps:
        mean, std, n = mean_std(p.get(key) for r in runs for p in r["curve"] if p["step"] == step)
        out.append((step, mean, std, n))
    return out


def layer_stats(runs: list[dict[str, Any]], key: str) -> list[tuple[float, float, int]]:
    lists = [r["layer_consistency"][key] for r in runs]
    width = min(len(values) for values in lists)
    return [mean_std(percent(values[i]) for values in lists) for i in range(width)]


def percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def difference(a: list[dict[str, Any]], b: list[dict[str, Any]], value) -> dict[str, Any]:
    """Difference of means ``value(a) - value(b)`` with the seeds' spread: the standard error of the difference
    (Welch), each side's range, and the per-seed (paired: same seed = same data order) differences."""
    va = {r["seed"]: value(r) for r in a}
    vb = {r["seed"]: value(r) for r in b}
    va = {s: v for s, v in va.items() if v is not None}
    vb = {s: v for s, v in vb.items() if v is not None}
    n = min(len(va), len(vb))
    if n == 0:
        return {"n": 0}
    ma, sa, _ = mean_std(va.values())
    mb, sb, _ = mean_std(vb.values())
    se = math.sqrt(sa ** 2 / len(va) + sb ** 2 / len(vb)) if len(va) > 1 and len(vb) > 1 else math.nan
    paired = [va[s] - vb[s] for s in sorted(set(va) & set(vb))]
    return {"n": n, "na": len(va), "nb": len(vb), "diff": ma - mb, "se": se, "paired": paired,
            "range_a": (min(va.values()), max(va.values())), "range_b": (min(vb.values()), max(vb.values()))}


def difference_line(label: str, d: dict[str, Any], unit: str = "") -> str:
    if d["n"] == 0:
        return f"- {label}: no runs yet."
    status = f"not resolved ({d['n']} seeds)" if d["n"] < 3 else f"{d['n']} seeds; reading below"
    se = f" ± {d['se']:.1f} (standard error of the difference)" if not math.isnan(d["se"]) else ""
    overlap = d["range_a"][0] <= d["range_b"][1] and d["range_b"][0] <= d["range_a"][1]
    return (f"- {label}: {d['diff']:+.1f}{unit}{se}; per seed {', '.join(f'{v:+.1f}' for v in d['paired'])}; "
            f"seed ranges [{d['range_a'][0]:.1f}, {d['range_a'][1]:.1f}] vs [{d['range_b'][0]:.1f}, "
            f"{d['range_b'][1]:.1f}] ({'overlap' if overlap else 'do not overlap'}). **{status}**")


def first_step_reaching(runs: list[dict[str, Any]], target: float) -> int | None:
    """The first step at which the mean PQ curve of ``runs`` reaches ``target``."""
    return next((step for step, mean, _, _ in mean_curve(runs, "PQ") if mean >= target), None)


def comparisons(arms: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = []
    def final(key):
        return lambda r: r["final"].get(key)

    def reach(target):
        return lambda r: steps_to(r["curve"], target)

    def lc_mean(key):
        return lambda r: percent(r["layer_consistency"][key])

    def get(arm):
        return arms.get(arm, [])

    lines += ["**1. Masked attention vs plain cross-attention** (`m2f` − `maskformer_decoder`):", ""]
    for key in ("PQ", "PQ_th", "AP", "mIoU"):
        lines.append(difference_line(f"final {key}", difference(get("m2f"), get("maskformer_decoder"), final(key))))
    def steps_lines(a: str, b: str) -> list[str]:
        out = []
        for target in PQ_TARGETS:
            counts = {arm: (sum(steps_to(r["curve"], target) is not None for r in get(arm)), len(get(arm)))
                      for arm in (a, b)}
            if any(k < n for k, n in counts.values()):
                out.append(f"- steps to PQ {target:.0f}: reached within the run by " + ", ".join(
                    f"`{arm}` in {k} of {n} seeds" for arm, (k, n) in counts.items()))
            else:
                out.append(difference_line(f"steps to PQ {target:.0f}", difference(get(a), get(b), reach(target))))
        return out

    lines += steps_lines("m2f", "maskformer_decoder")
    for arm in ("m2f_piloting", "mp_former"):
        lines += ["", f"**2. Mask piloting: faster and higher** (`{arm}` − `m2f`):", ""]
        for key in ("PQ", "PQ_th", "AP", "mIoU"):
            lines.append(difference_line(f"final {key}", difference(get(arm), get("m2f"), final(key))))
        lines += steps_lines(arm, "m2f")
        if get(arm) and get("m2f"):
            target = mean_std(r["final"].get("PQ") for r in get("m2f"))[0]
            step = first_step_reaching(get(arm), target)
            lines.append(f"- first step at which the mean PQ curve of `{arm}` reaches `m2f`'s final mean PQ "
                         f"({target:.1f}): {step if step is not None else 'not within the run'} of "
                         f"{get(arm)[0]['max_iter']} (seeds: {len(get(arm))} vs {len(get('m2f'))}"
                         f"{'' if min(len(get(arm)), len(get('m2f'))) >= 3 else '; not resolved'})")
    for arm in ("m2f_piloting", "mp_former"):
        lines += ["", f"**3. Layer consistency at the end** (`{arm}` − `m2f`, in points):", ""]
        for key in ("mean_mIoU_L", "mean_Util"):
            lines.append(difference_line(key, difference(get(arm), get("m2f"), lc_mean(key))))
    return lines


def markdown(arms: dict[str, list[dict[str, Any]]], status: list[str], plots: list[str], reading: str) -> str:
    smoke = any(r.get("smoke") for runs in arms.values() for r in runs)
    lines = [
        "# Convergence: Mask2Former, mask piloting, MP-Former and a MaskFormer-style decoder", "",
        "Generated by `python experiments/convergence.py summarise` from `experiments/results/convergence/*.json` "
        "(one file per arm and seed); the runs: `python experiments/convergence.py run-all` (resumable; "
        "`status` shows what is left)." + (" **SMOKE RUN: the numbers are meaningless.**" if smoke else ""), "",
        ("The default FashionScenes recipe (`fashion_scenes_lite0`: EfficientNet-Lite0, 1,100 iterations of batch 4, "
        "bf16 autocast, the same 20,000 generated training scenes); evaluation every 100 iterations on the 200 val "
        "images in fp32 (as `mask2former evaluate`); seeds `train.seed` = 0, 1, 2 (initialisation and data order; "
        "the same seed gives every arm the same data order). Mean ± std over seeds."), "",
        "| arm | preset + overrides | seeds done |", "|---|---|---:|",
    ]
    for arm in DEFAULT_ARMS + tuple(a for a in arms if a not in DEFAULT_ARMS):
        preset, overrides = ARMS[arm]
        shown = " ".join([f"`{preset}`", *(f"`{o}`" for o in overrides)])
        lines.append(f"| `{arm}` | {shown} | {len(arms.get(arm, []))} |")
    lines += ["", "Status and CPU time (`python experiments/convergence.py status`):", "", "```", *status, "```", ""]
    if not arms:
        return "\n".join([*lines, "No run has finished yet.", "", *closing_sections(reading)])
    lines += ["## Final values and steps to PQ 50 / 55", "",
              ("Steps to PQ x: the first evaluation (every 100 iterations) at which a seed reaches x; mean ± std over the "
              "seeds that reach it within the run, (k/n) when not all do."), "",
              ("| arm | seeds | PQ | PQ_th | PQ_st | AP | mIoU | steps to PQ 50 | steps to PQ 55 | s/iteration | "
              "s/evaluation | minutes/run |"), "|---|---:|" + "---:|" * 10]
    for arm, runs in arms.items():
        steps = []
        for target in PQ_TARGETS:
            reached = [steps_to(r["curve"], target) for r in runs]
            stats = mean_std(s for s in reached if s is not None)
            hits = sum(s is not None for s in reached)
            steps.append(cell(stats, 0) + ("" if hits == len(runs) else f" ({hits}/{len(runs)})") if hits else
                         f"never (0/{len(runs)})")
        def timing(key, runs=runs):
            return mean_std(r["timing"].get(key) for r in runs)

        lines.append(f"| `{arm}` | {len(runs)} | " + " | ".join(cell(mean_std(r["final"].get(k) for r in runs))
                                                                  for k in CURVE_KEYS)
                     + f" | {steps[0]} | {steps[1]} | {cell(timing('seconds_per_iteration'), 3)} | "
                       f"{cell(timing('seconds_per_evaluation'))} | "
                       f"{cell(mean_std(r['timing']['wall_seconds'] / 60 for r in runs))} |")
    lines += ["", "## Curves", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    for key in PLOTTED:
        lines += [f"{key} vs step:", "", "| step | " + " | ".join(f"`{a}`" for a in arms) + " |",
                  "|---:|" + "---:|" * len(arms)]
        curves = {arm: {step: (m, s, n) for step, m, s, n in mean_curve(runs, key)} for arm, runs in arms.items()}
        for step in sorted({step for c in curves.values() for step in c}):
            lines.append(f"| {step} | " + " | ".join(cell(curves[a].get(step, (math.nan, math.nan, 0)))
                                                     for a in arms) + " |")
        lines.append("")
    lines += ["## Layer consistency at the end", "",
              ("`evaluation/layer_consistency.py` (our reconstruction of MP-Former's definitions) on the 200 val images "
              "with the training matcher, final weights. Prediction 0 comes from the initial queries, prediction k "
              "from layer k; the MaskFormer decoder has no prediction 0 (columns aligned at the final prediction). "
              "mIoU-L_i compares predictions i and i+1; Util of the final prediction is 100 by definition."), ""]
    for key in ("mIoU_L", "Util"):
        stats = {arm: layer_stats(runs, key) for arm, runs in arms.items()}
        width = max((len(s) for s in stats.values()), default=0)
        lines += [f"| {key} | " + " | ".join(str(i) for i in range(width)) + " | mean |", "|---|" + "---:|" * (width + 1)]
        for arm, values in stats.items():
            summary_key = "mean_mIoU_L" if key == "mIoU_L" else "mean_Util"
            mean = cell(mean_std(percent(r["layer_consistency"][summary_key]) for r in arms[arm]))
            lines.append(f"| `{arm}` | " + " | ".join(["-"] * (width - len(values)) + [cell(v) for v in values])
                         + f" | {mean} |")
        lines.append("")
    lines += ["## The numbers behind the three claims", "",
              ("Differences of means (A − B) with the standard error of the difference over seeds, the per-seed "
              "differences (same seed = same data order) and each arm's range over seeds. With fewer than 3 seeds in "
              "an arm the comparison is not resolved; this section states no verdict."), "", *comparisons(arms), "",
              *closing_sections(reading)]
    return "\n".join(lines)


def closing_sections(reading: str) -> list[str]:
    return ["## Reading", "", READING_START, reading.strip() or "_To be written by a person after the runs._",
            READING_END, "", "## History", "",
            ("A first study at 150 iterations (2 seeds, 100 val images), where no arm yet kept a thing segment "
             "(PQ_th = 0): [experiments/results/mp_former.md](../experiments/results/mp_former.md), produced by "
             "`experiments/mp_former.py` (commit 2828a84, folded into `experiments/convergence.py`). Its `m2f` arm "
             "had no piloting, like `m2f` here."), ""]


def plot(arms: dict[str, list[dict[str, Any]]], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for axis, key in zip(axes.flat, PLOTTED):
        for arm, runs in arms.items():
            curve = mean_curve(runs, key)
            steps = [c[0] for c in curve]
            means = [c[1] for c in curve]
            stds = [0.0 if math.isnan(c[2]) else c[2] for c in curve]
            line, = axis.plot(steps, means, marker="o", markersize=3, label=f"{arm} ({len(runs)} seeds)")
            axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=line.get_color(), alpha=0.2)
        if key == "PQ":
            for target in PQ_TARGETS:
                axis.axhline(target, color="grey", linestyle=":", linewidth=1)
        _label_axis(axis, "iteration", f"{key} (val)", f"{key} vs iteration (mean ± std over seeds)")
    curves_path = _save_figure(plt, figure, directory / "convergence_curves.png")

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in ((axes[0], "mIoU_L", "mIoU-L_i (prediction i vs i+1)"), (axes[1], "Util", "Util_i")):
        stats = {arm: layer_stats(runs, key) for arm, runs in arms.items()}
        width = max((len(s) for s in stats.values()), default=0)
        for arm, values in stats.items():
            axis.errorbar(range(width - len(values), width), [v[0] for v in values],
                          yerr=[0.0 if math.isnan(v[1]) else v[1] for v in values], marker="o", capsize=3, label=arm)
        _label_axis(axis, "decoder prediction i", f"{key} (%)", title + ", end of training")
    layers_path = _save_figure(plt, figure, directory / "convergence_layers.png")
    return [curves_path, layers_path]


def _label_axis(axis, xlabel: str, ylabel: str, title: str) -> None:
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def _save_figure(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def kept_reading(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text()
    start, end = text.find(READING_START), text.find(READING_END)
    if start < 0 or end < start:
        return ""
    reading = text[start + len(READING_START):end].strip()
    return "" if reading.startswith("_To be written") else reading


def summarise(paths: Paths) -> Path:
    arms = by_arm(load_results(paths.results))
    document = paths.docs / "convergence.md"
    document.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(arms, paths.docs) if arms else []
    text = markdown(arms, status_lines(paths), [str(p) for p in plots], kept_reading(document))
    document.write_text(text)
    return document


# ----- command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train one arm and seed (continues from its last checkpoint)")
    run.add_argument("--arm", required=True, choices=list(ARMS))
    run.add_argument("--seed", required=True, type=int)
    run.add_argument("--force", action="store_true", help="run even if the result file exists")
    run_all = commands.add_parser("run-all", help="the missing runs, seed by seed")
    run_all.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    run_all.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    status = commands.add_parser("status", help="done / in progress / missing runs and the CPU time left")
    status.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    status.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    commands.add_parser("summarise", help="docs/convergence.md and docs/convergence_*.png from the result files")
    calib = commands.add_parser("calibrate", help="smoke runs of every arm -> seconds per iteration / evaluation")
    calib.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    calib.add_argument("--runs-root", default=str(ROOT / "runs"),
                       help="where full runs of the default presets (fashion_scenes, fashion_scenes_mpformer) "
                            "may be, to anchor the smoke rates on ('' for none)")
    calib.add_argument("--reuse-smoke", action="store_true", help="no new smoke runs: recompute from the last ones")
    for sub in (run, run_all, status, commands.choices["summarise"]):
        sub.add_argument("--smoke", action="store_true",
                         help=f"{SMOKE_ITERS} iterations, {SMOKE_VAL} val images; everything under runs/convergence_smoke")
        sub.add_argument("--runs-dir", default=None, help="default: runs/convergence (git-ignored)")
        sub.add_argument("--results-dir", default=None, help="default: experiments/results/convergence")
    for sub in (run, run_all):
        sub.add_argument("overrides", nargs="*", help="extra key=value config overrides (recorded nowhere else: "
                                                      "keep them out of real runs)")
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        calibration = calibrate(args.arms, Path(args.runs_root) if args.runs_root else None, args.reuse_smoke)
        print(json.dumps(calibration, indent=1))
        print("\n".join(status_lines(Paths(False))))
        return
    paths = Paths(args.smoke, args.runs_dir, args.results_dir)
    if args.command == "run":
        run_one(args.arm, args.seed, paths, args.overrides, args.force)
    elif args.command == "run-all":
        order = run_order(args.arms, args.seeds)
        missing = [(arm, seed) for arm, seed in order if not paths.result_file(arm, seed).exists()]
        print("\n".join(status_lines(paths, args.arms, args.seeds)), flush=True)
        for index, (arm, seed) in enumerate(missing, 1):
            print(f"\n=== run {index}/{len(missing)}: {arm} seed {seed} ===", flush=True)
            run_one(arm, seed, paths, args.overrides)
    elif args.command == "status":
        print("\n".join(status_lines(paths, args.arms, args.seeds)))
    elif args.command == "summarise":
        print(f"wrote {summarise(paths)}")


if __name__ == "__main__":
    main()
