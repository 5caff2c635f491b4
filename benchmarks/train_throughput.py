"""Training throughput: samples/s and tokens/s through the Ray Train loop for tiny and S on CPU
with 1 and 2 workers, the data loader alone, and on a GPU (when one is lent) model FLOPs
utilisation for S and B in bf16.

The lake defaults to the floor's (benchmarks/train_floor.py: 50 Meta-World episodes, two 64x64
views, 8x8 token grids of 1024 codes); it is copied so benchmark runs never land in its models/.

    .venv/bin/python benchmarks/train_throughput.py [--lake DIR] [--steps 12] [--sizes tiny,S] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
DEFAULT_LAKE = Path(__file__).resolve().parent.parent / ".floor-work" / "lake"
# dense bf16 peak TFLOP/s by device name, for MFU
PEAK_TFLOPS = {"H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "T4": 65.0}


def copy_lake(lake: str) -> str:
    scratch = tempfile.mkdtemp(prefix="gr2-bench-")
    shutil.copytree(lake, os.path.join(scratch, "lake"), ignore=shutil.ignore_patterns("gr2"))
    return os.path.join(scratch, "lake")


def loader_throughput(lake: str, stage: str, batch_size: int, batches: int) -> dict:
    """Samples/s of the data path alone: Lance reads, windows, shuffle buffer, collation."""
    from gr2.lake.lake import Lake
    from gr2.training.data import iter_batches, plan_data
    from gr2.training.model import GR2Config

    c = GR2Config.named("tiny")
    spec = plan_data(Lake(lake), stage, c.history, c.chunk)
    it = iter_batches(spec, batch_size)
    next(it)  # the first read opens the dataset
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["id"])
    dt = time.perf_counter() - t
    frames = next(it)["frames"]
    return {"stage": stage, "batch_size": batch_size, "samples_per_s": n / dt,
            "tokens_per_s": n * frames[0].numel() / dt, "history": c.history, "views": frames.shape[2]}


def train_throughput(lake: str, size: str, workers: int, steps: int, batch_size: int) -> dict:
    from gr2.training.loop import TrainConfig, train
    from gr2.training.metrics import read_metrics

    config = TrainConfig(stage="finetune", size=size, steps=steps, batch_size=batch_size, workers=workers,
                         checkpoint_every=steps, report_every=steps, warmup_steps=1,
                         seed=workers)  # the run id ignores the worker count (resumable either way): keep runs apart
    result = train(lake, config)
    records = read_metrics(result.run_dir)[2:]  # the first steps warm up allocators and threads
    return {"size": size, "workers": workers, "batch_size": batch_size, "steps_timed": len(records),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in records),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "step_s": statistics.median(r["step_s"] for r in records), "wall_s_with_startup": round(result.seconds, 1)}


def gpu_mfu(size: str, batch_size: int, steps: int = 20) -> dict:
    """Model FLOPs utilisation of one GPU training the `size` model in bf16 on random tokens."""
    import torch

    from gr2.training.model import GR2, GR2Config

    c = GR2Config.named(size, codebook_size=1024, grid_h=8, grid_w=8, n_views=2)
    model = GR2(c).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    T, V, N = c.history, c.n_views, c.tokens_per_view
    batch = {"frames": torch.randint(0, c.codebook_size, (batch_size, T, V, N), device="cuda"),
             "text_embedding": torch.randn(batch_size, c.text_dim, device="cuda"),
             "state": torch.randn(batch_size, T, c.state_dim, device="cuda"),
             "action": torch.randn(batch_size, T, c.chunk, c.action_dim, device="cuda")}
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / steps
    L = 1 + T * (V * N + 2)  # sequence length
    # forward + backward = 3x forward; forward = 2 flops per parameter per token + attention
    flops = 3 * batch_size * (2 * model.num_params() * L + 2 * c.n_layer * L * L * c.n_embd)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = flops / step_s / 1e12
    return {"size": size, "device": name, "batch_size": batch_size, "sequence": L, "step_s": step_s,
            "samples_per_s": batch_size / step_s, "model_tflops": achieved,
            "mfu": achieved / peak if peak else None, "peak_tflops": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", default=str(DEFAULT_LAKE))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--sizes", default="tiny,S")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--batch-size", type=int, default=16, help="global batch on CPU")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    from gr2.flows.runtime import ensure_ray, offline_defaults

    offline_defaults()
    if not os.path.exists(os.path.join(args.lake, "steps.lance")):
        raise SystemExit(f"no robot lake at {args.lake}: run benchmarks/train_floor.py first, or pass --lake")
    lake = copy_lake(args.lake)
    ensure_ray()
    result = {"command": f"benchmarks/train_throughput.py --lake {args.lake} --steps {args.steps} --sizes {args.sizes} "
                         f"--workers {args.workers} --batch-size {args.batch_size}",
              "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}, "loader": [], "cpu": [], "gpu": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    result["loader"].append(loader_throughput(lake, "finetune", 32, 50))
    print(result["loader"][-1], flush=True)
    save()
    for size in args.sizes.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            result["cpu"].append(train_throughput(lake, size, workers, args.steps, args.batch_size))
            print(result["cpu"][-1], flush=True)
            save()
    import torch

    if torch.cuda.is_available():
        for size, batch in (("S", 32), ("B", 16)):
            result["gpu"].append(gpu_mfu(size, batch))
            print(result["gpu"][-1], flush=True)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    save()
    shutil.rmtree(os.path.dirname(lake), ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
