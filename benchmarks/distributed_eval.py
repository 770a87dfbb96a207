"""``mask2former evaluate`` in 1 process vs N processes (``torchrun --nproc_per_node N``) on the same checkpoint and
data set; by default the 200-image FashionScenes val split of the CPU preset. Prints the wall time of each command
(process start and model load included), the evaluation time the command reports (data loading, forward,
matching and rank 0's merge), the per-image cost, and whether the metrics are equal to all digits.

Threads: the 1-process run gets all ``--cores`` as torch threads; under torchrun each of the N processes gets
``cores / N`` (torchrun's default would be 1), so both use the same cores. A third run, 1 process on 1 thread,
separates the gain of N processes from the cost of OpenMP threads: on a 2-core machine shared with other work,
one process on 2 threads ran 6x slower than on 1 thread (71 s vs 12 s for 40 images; its threads spin-wait for
each other while other processes hold the cores).

    python benchmarks/distributed_eval.py --checkpoint runs/fashion_scenes/model_final [--nproc 2] [--cores 2]
        [--config fashion_scenes_lite0] [--repeats 1] [key=value ...]

Writes ``benchmarks/results/distributed_eval.json``. Per-image costs at COCO size and the 8-GPU projection built on
them are in docs/distributed.md (``--coco-costs`` measures the CPU side: post-processing, matching, AP).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distributed_eval.json"


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_evaluate(nproc: int, args: argparse.Namespace, work: Path, threads: int | None = None) -> dict:
    """One ``evaluate`` command; its wall time, the seconds it reports, and its metrics."""
    threads = threads or max(args.cores // nproc, 1)
    out = work / f"metrics_{nproc}x{threads}.json"
    evaluate = ["-m", "mask2former", "evaluate", "--checkpoint", args.checkpoint, "--config", args.config,
                "--out", str(out), "--tasks", args.tasks, *args.overrides]
    if nproc == 1:
        command = [sys.executable, *evaluate]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        command = [*torchrun, *evaluate]
    started = time.perf_counter()
    finished = subprocess.run(command, env=_env(threads), capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    data = json.loads(out.read_text())
    table = finished.stdout[finished.stdout.index("class"):] if "class" in finished.stdout else finished.stdout
    return {"processes": nproc, "threads_per_process": threads, "wall_seconds": round(wall, 2),
            "evaluate_seconds": round(data["seconds"], 2), "num_images": data["num_images"],
            "seconds_per_image": round(data["seconds"] / data["num_images"], 4), "metrics": data["metrics"],
            "table": table.split("metrics written")[0].strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint (e.g. runs/fashion_scenes/model_final)")
    parser.add_argument("--config", default="fashion_scenes_lite0")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the distributed run")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores shared by all processes")
    parser.add_argument("--tasks", default="panoptic,instance,semantic")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (alternating); the fastest is kept")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. data.num_val_images=50)")
    args = parser.parse_args()
    if not Path(args.checkpoint).exists():
        sys.exit(f"checkpoint {args.checkpoint} not found")

    work = Path(tempfile.mkdtemp(prefix="distributed_eval_"))
    setups = [(1, args.cores), (args.nproc, max(args.cores // args.nproc, 1))]
    if args.cores > 1:
        setups.append((1, 1))
    runs: dict[str, list[dict]] = {f"{n}x{t}": [] for n, t in setups}
    try:
        for _ in range(args.repeats):
            for nproc, threads in setups:
                row = run_evaluate(nproc, args, work, threads)
                runs[f"{nproc}x{threads}"].append(row)
                print(f"{nproc} process(es) x {threads} thread(s): wall {row['wall_seconds']} s, evaluation "
                      f"{row['evaluate_seconds']} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {key: min(r, key=lambda row: row["evaluate_seconds"]) for key, r in runs.items()}
    one, many = best[f"1x{args.cores}"], best[f"{args.nproc}x{max(args.cores // args.nproc, 1)}"]
    single_thread = best.get("1x1", one)
    equal_tables = one["table"] == many["table"] == single_thread["table"]
    differences = {key: abs(one["metrics"][key] - many["metrics"][key]) for key in one["metrics"]
                   if one["metrics"][key] is not None and many["metrics"][key] is not None}  # undefined = null
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "checkpoint": args.checkpoint, "config": args.config, "overrides": args.overrides,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "cores_used": args.cores,
        "load_average_at_end": os.getloadavg()[0],
        "runs": runs,
        "speedup_evaluate": round(one["evaluate_seconds"] / many["evaluate_seconds"], 3),
        "speedup_evaluate_vs_1_process_1_thread": round(single_thread["evaluate_seconds"] / many["evaluate_seconds"], 3),
        "speedup_wall": round(one["wall_seconds"] / many["wall_seconds"], 3),
        "printed_tables_equal": equal_tables,
        "max_metric_difference": max(differences.values(), default=0.0),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(one["table"])
    print(f"\n{'processes':>9} | {'threads':>7} | {'wall s':>7} | {'eval s':>7} | {'s/image':>7}")
    for row in [one] + ([single_thread] if single_thread is not one else []) + [many]:
        print(f"{row['processes']:>9} | {row['threads_per_process']:>7} | {row['wall_seconds']:>7} | "
              f"{row['evaluate_seconds']:>7} | {row['seconds_per_image']:>7}")
    print(f"speedup (evaluation) {result['speedup_evaluate']}x ({result['speedup_evaluate_vs_1_process_1_thread']}x "
          f"vs 1 process x 1 thread), (wall) {result['speedup_wall']}x; printed metrics "
          f"{'equal' if equal_tables else 'DIFFERENT'} (max |difference| {result['max_metric_difference']:.3g}); "
          f"written to {RESULTS}")


if __name__ == "__main__":
    main()
