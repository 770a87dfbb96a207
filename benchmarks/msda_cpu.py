"""The CPU deformable-attention kernel vs the grid_sample path: forward, and forward + backward, interleaved.

Shapes are the pixel decoder's at two settings: the Swin-T training benchmark (batch 2 at 256^2: levels 32^2, 16^2,
8^2, 8 heads of 32 channels, 4 points) and the default recipe (batch 4 at 256^2, hidden 128: 8 heads of 16).
Sampling locations are each query's own position plus offsets of about 2 pixels, as in a trained model.

    python benchmarks/msda_cpu.py [--threads 2] [--repeats 20]

Writes benchmarks/results/msda_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from mask2former.modeling.kernels.cpu_ms_deform_attn import ms_deform_attn_cpu
from mask2former.modeling.ms_deform_attn import ms_deform_attn_core_pytorch

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "swin_t_train_step": dict(batch=2, heads=8, head_dim=32, shapes=[(32, 32), (16, 16), (8, 8)], points=4),
    "default_recipe": dict(batch=4, heads=8, head_dim=16, shapes=[(32, 32), (16, 16), (8, 8)], points=4),
}


def make_inputs(batch: int, heads: int, head_dim: int, shapes: list[tuple[int, int]], points: int):
    generator = torch.Generator().manual_seed(0)
    levels = len(shapes)
    centres = [torch.stack(torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
                           [::-1], -1).view(-1, 2) for h, w in shapes]
    reference = torch.cat(centres)  # every token of every level is a query, as in the encoder
    queries = reference.shape[0]
    pixel = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(1, 1, 1, levels, 1, 2)
    offsets = torch.randn(batch, queries, heads, levels, points, 2, generator=generator) * 2 / pixel
    locations = reference[None, :, None, None, None, :] + offsets
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator).softmax(-1)
    value = torch.randn(batch, queries, heads, head_dim, generator=generator)
    return value, locations, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "msda_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    implementations = {"c_kernel": ms_deform_attn_cpu, "grid_sample": ms_deform_attn_core_pytorch}
    results = {}
    for setting, shape in SETTINGS.items():
        shapes = shape["shapes"]
        inputs = [t.requires_grad_() for t in make_inputs(**shape)]
        grad = torch.randn(inputs[0].shape[0], inputs[1].shape[1], shape["heads"] * shape["head_dim"])

        def forward(fn):
            with torch.no_grad():
                fn(inputs[0], shapes, inputs[1], inputs[2])

        def forward_backward(fn):
            torch.autograd.grad(fn(inputs[0], shapes, inputs[1], inputs[2]), inputs, grad)

        outputs = {name: fn(inputs[0], shapes, inputs[1], inputs[2]) for name, fn in implementations.items()}
        times = {(name, kind): [] for name in implementations for kind in ("forward", "forward_backward")}
        for repeat in range(args.repeats + 2):  # two warm-up rounds, interleaved like the timed ones
            for (name, kind), values in times.items():
                run = forward if kind == "forward" else forward_backward
                start = time.perf_counter()
                run(implementations[name])
                if repeat >= 2:
                    values.append(time.perf_counter() - start)
        medians = {f"{name}_{kind}_ms": round(statistics.median(v) * 1e3, 2) for (name, kind), v in times.items()}
        results[setting] = {
            **shape, "queries": inputs[1].shape[1], **medians,
            "speedup_forward": round(medians["grid_sample_forward_ms"] / medians["c_kernel_forward_ms"], 2),
            "speedup_forward_backward": round(
                medians["grid_sample_forward_backward_ms"] / medians["c_kernel_forward_backward_ms"], 2),
            "max_abs_difference": float((outputs["c_kernel"] - outputs["grid_sample"]).abs().max()),
        }
        print(setting, json.dumps(results[setting]))
    report = {"what": __doc__.splitlines()[0], "threads": args.threads, "repeats": args.repeats, "settings": results,
              "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
