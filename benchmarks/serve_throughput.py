"""`mask2former serve` under concurrent load: the current server against an earlier one, same model, same client.

Each server runs in its own process (as it would in use) with ``--threads`` torch threads; this process sends
``--requests`` POST /api/predict uploads (FashionScenes val PNGs at ``--size``², panoptic task with the overlay PNG,
as the page asks) from ``--clients`` threads at once, and records every answer's status and latency. The earlier
server is the module ``src/mask2former/serve/app.py`` at git revision ``--old-ref`` (the hand-written
``http.server`` version by default), loaded into the current package. A third run, ``new_1thread``, is the new
server with one torch thread (leaving a core to HTTP, decoding and drawing), to show what the thread count does.
Rounds alternate old / new / new_1thread, so drifting load on the machine affects all; the ratios are taken per
round and their medians reported.

    python benchmarks/serve_throughput.py --checkpoint runs/fashion_scenes/model_final

Writes benchmarks/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_throughput.json"
OLD_REF = "a4636f5"
# old and new with --threads torch threads each; new_1thread: the new server with one torch thread
VARIANTS = ("old", "new", "new_1thread")  # the last commit with the threading http.server + email-parser multipart version


# --------------------------------------------------------------------------------------------------- server side
def run_server(variant: str, module_path: str, checkpoint: str, threads: int, url_file: str, batch: int) -> None:
    import torch

    torch.set_num_threads(1 if variant == "new_1thread" else threads)
    if variant == "old":
        # Loaded as a module of the current package, so its relative imports resolve as they did in the repo.
        import mask2former.serve  # noqa: F401

        spec = importlib.util.spec_from_file_location("mask2former.serve._old_app", module_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        server = module.make_server(checkpoint, "127.0.0.1", 0)
    else:
        from mask2former.serve import app as module

        server = module.make_server(checkpoint, "127.0.0.1", 0, max_batch_size=batch)
    Path(url_file).write_text(server.url)
    try:
        server.serve_forever()
    finally:
        server.server_close()


# --------------------------------------------------------------------------------------------------- client side
def post(url: str, data: bytes, timeout: float = 300.0) -> tuple[int, float, dict]:
    request = urllib.request.Request(url + "api/predict?task=panoptic", data=data,
                                     headers={"Content-Type": "image/png"}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, status = response.read(), response.status
    except urllib.error.HTTPError as error:
        body, status = error.read(), error.code
    elapsed = time.perf_counter() - start
    return status, elapsed, json.loads(body)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(variant: str, args, uploads: list[bytes], module_path: str) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        url_file = Path(scratch) / "url"
        command = [sys.executable, __file__, "--_server", variant, "--_module", module_path, "--_url-file",
                   str(url_file), "--checkpoint", str(args.checkpoint), "--threads", str(args.threads),
                   "--max-batch-size", str(args.max_batch_size)]
        env = {**os.environ, "OMP_NUM_THREADS": str(1 if variant == "new_1thread" else args.threads)}
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr_lines: list[bytes] = []
        threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True).start()
        try:
            for _ in range(1200):
                if url_file.exists() and url_file.read_text():
                    break
                if process.poll() is not None:
                    raise RuntimeError(f"{variant} server exited: {b''.join(stderr_lines).decode()[-2000:]}")
                time.sleep(0.1)
            url = url_file.read_text()
            for index in range(args.warmup):  # first calls pay for allocations and lazy initialisation
                status, _, body = post(url, uploads[index % len(uploads)])
                assert status == 200, body
            with ThreadPoolExecutor(max_workers=args.warmup) as pool:
                list(pool.map(lambda data: post(url, data), uploads[: args.warmup]))
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                answers = list(pool.map(lambda i: post(url, uploads[i % len(uploads)]), range(args.requests)))
            wall = time.perf_counter() - start
        finally:
            process.terminate()
            process.wait(30)
    latencies = [elapsed for _, elapsed, _ in answers]
    statuses = [status for status, _, _ in answers]
    batch_sizes = [body.get("batch_size", 1) for _, _, body in answers]
    return {
        "answered_200": statuses.count(200), "requests": len(answers),
        "requests_per_s": round(len(answers) / wall, 3), "wall_s": round(wall, 3),
        "latency_s": {name: round(percentile(latencies, q), 3)
                      for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        "mean_batch_size": round(statistics.mean(batch_sizes), 2),
        "inference_ms_median": round(statistics.median(body.get("inference_ms", 0.0) for _, _, body in answers), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "fashion_scenes" / "model_final")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the server process")
    parser.add_argument("--max-batch-size", type=int, default=4, help="the new server's batch limit")
    parser.add_argument("--old-ref", default=OLD_REF, help="git revision of the earlier serve/app.py")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--_server", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--_module", help=argparse.SUPPRESS)
    parser.add_argument("--_url-file", dest="url_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._server:
        run_server(args._server, args._module, str(args.checkpoint), args.threads, args.url_file, args.max_batch_size)
        return

    import numpy as np
    from PIL import Image

    from mask2former.data import FashionScenes

    load_before = os.getloadavg()
    dataset = FashionScenes("val", num_images=16, image_size=args.size)
    uploads = []
    for index in range(len(dataset)):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(dataset[index]["image"].permute(1, 2, 0).numpy())).save(buffer, "PNG")
        uploads.append(buffer.getvalue())
    old_source = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.old_ref}:src/mask2former/serve/app.py"],
                                check=True, capture_output=True).stdout
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        module_path = str(Path(scratch) / "old_app.py")
        Path(module_path).write_bytes(old_source)
        for round_index in range(args.rounds):
            result = {variant: measure(variant, args, uploads, module_path) for variant in VARIANTS}
            for variant in ("new", "new_1thread"):
                ratio = result[variant]["requests_per_s"] / result["old"]["requests_per_s"]
                result[f"ratio_{variant}_over_old"] = round(ratio, 3)
            print(json.dumps({"round": round_index, **result}), flush=True)
            rounds.append(result)
    summary = {
        "what": f"POST /api/predict?task=panoptic (with overlay PNG), {args.size}x{args.size} FashionScenes val PNGs, "
                f"{args.requests} requests from {args.clients} client threads, server process with "
                f"{args.threads} torch threads",
        "checkpoint": str(args.checkpoint), "old": f"serve/app.py at {args.old_ref} (http.server, one forward per "
        f"request under a lock), {args.threads} torch threads",
        "new": f"Starlette + uvicorn, batches up to {args.max_batch_size}, {args.threads} torch threads",
        "new_1thread": "the new server with 1 torch thread",
        "cpu_count": os.cpu_count(), "load_average_before": load_before,
        "rounds": rounds,
        "median_requests_per_s": {variant: statistics.median(r[variant]["requests_per_s"] for r in rounds)
                                  for variant in VARIANTS},
        "ratio_new_over_old_median": statistics.median(r["ratio_new_over_old"] for r in rounds),
        "ratio_new_1thread_over_old_median": statistics.median(r["ratio_new_1thread_over_old"] for r in rounds),
        "all_answered": all(r[v]["answered_200"] == r[v]["requests"] for r in rounds for v in VARIANTS),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({key: summary[key] for key in ("median_requests_per_s", "ratio_new_over_old_median",
                                                    "ratio_new_1thread_over_old_median", "all_answered")}))


if __name__ == "__main__":
    main()
