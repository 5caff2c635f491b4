"""Samples per second a training loop gets from the lake, beside LeRobot's own loader on the same
episodes (issue 16; LeRobot's tracker #1623: 1.0 s waiting for data per 0.7 s of backprop).

    .venv/bin/python benchmarks/loader.py [--episodes 16] [--size 128] [--rounds 7] [--seconds 4]
        [--work DIR] [--lake LAKE] [--lerobot-python .venv-lerobot/bin/python]

Builds (or, with --work pointing at an earlier run, reuses; with --lake, takes) a lake of
Meta-World drawer-open-v3 expert episodes with two cameras: record (gr2.sim.record) -> ingest -> tokenize (gr2 tokenize's
tokenize_steps, a random-init tokenizer: its tokens mean nothing, their cost is what is measured),
then exports it as LeRobot v3.0 (gr2.robot.export.export_lerobot). Then, in one run, each loader
serves shuffled batches of 32 through a torch DataLoader with 2 workers and the same
delta_timestamps (two frames 0.1 s apart on each camera and on the state, a chunk of 10 actions):

    gr2 tokens   StepsDataset(serve="tokens")     VQ token grids as int64
    gr2 frames   StepsDataset(serve="frames")     the stored JPEGs, decoded to float CHW in [0, 1]
    LeRobot      LeRobotDataset (0.4.4)           its mp4s decoded by torchcodec, float CHW in [0, 1]

LeRobot cannot import beside our torch, so it runs in .venv-lerobot through
benchmarks/lerobot_loader_bench.py; the loaders take turns, round after round, so the shared
machine's noise falls on all of them alike: each loader's median round is reported, and its ratio to
LeRobot as the median of the per-round ratios.
Prints a table and writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).parent / "results" / "loader.json"
LEROBOT_PYTHON = REPO / ".venv-lerobot" / "bin" / "python"
LEROBOT_BENCH = Path(__file__).parent / "lerobot_loader_bench.py"
TASK = "drawer-open-v3"
CAMERAS = ("corner", "gripperPOV")
# The tokenizer robot_ingest.py calls "small": f=8, 256 codes, random init.
TOKENIZER = {"resolution": 64, "downsample": 8, "channels": 8, "z_channels": 16, "codebook_size": 256, "code_dim": 8}


def delta_timestamps(fps: int) -> dict[str, list[float]]:
    """Two frames 0.1 s apart per camera and for the state, and the next 10 actions (at the step rate)."""
    history = [-0.1, 0.0]
    return {**{f"observation.images.{c}": history for c in CAMERAS}, "observation.state": history,
            "action": [i / fps for i in range(10)]}


# -- the lake and its LeRobot copy ------------------------------------------------------------------


def build(work: Path, episodes: int, size: int, lake_root: str | None = None) -> dict:
    """Record, ingest, tokenize and export under `work`, skipping whatever an earlier run finished;
    with `lake_root` (a tokenized lake with CAMERAS), only its export."""
    from gr2.flows.runtime import ensure_ray, offline_defaults

    offline_defaults()
    os.environ["GR2_PROGRESS"] = "0"
    done = work / "built.json"
    if done.exists():
        return json.loads(done.read_text())
    ensure_ray(num_cpus=2)
    from gr2.lake.lake import Lake
    from gr2.robot.export import export_lerobot

    timings, funnel = {}, None
    if lake_root is None:
        lake_root = str(work / "lake")
        funnel = record_ingest_tokenize(work, Lake(lake_root), episodes, size, timings)
    lake = Lake(lake_root)
    lerobot_root = work / "lerobot"
    shutil.rmtree(lerobot_root, ignore_errors=True)  # a half-written export of a killed run
    t = time.perf_counter()
    exported = export_lerobot(lake, str(lerobot_root))
    timings["export_s"] = time.perf_counter() - t
    (dataset,) = exported.datasets
    width = lake.read("episodes", columns=["frame_width"], filter="status = 'accepted'").column(0)[0].as_py()
    built = {"lake": lake.root, "lerobot": dataset.root, "fps": dataset.fps, "episodes": dataset.episodes,
             "frames": dataset.frames, "cameras": dataset.cameras, "size": width, "funnel": funnel,
             "build_timings_s": timings}
    done.write_text(json.dumps(built, indent=1))
    import ray

    ray.shutdown()  # its idle workers would share the 2 cores with the loaders
    return built


def record_ingest_tokenize(work: Path, lake, episodes: int, size: int, timings: dict) -> dict:
    """Meta-World expert episodes into `lake`, tokenized by a random-init tokenizer; the ingest funnel."""
    import torch

    from gr2.robot.ingest import IngestConfig, ingest
    from gr2.robot.tokens import tokenize_steps
    from gr2.sim.record import RecordConfig, record
    from gr2.tokenizers import Tokenizer, TokenizerConfig, save_checkpoint

    recording = work / "recording"
    if not (recording / "meta" / "info.json").exists():
        t = time.perf_counter()
        # Ray workers render and exit (max_calls=1): osmesa never meets torch in this process.
        record(str(recording), RecordConfig(tasks=(TASK,), episodes=episodes, seed=0, width=size, height=size))
        timings["record_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = ingest([str(recording)], lake, IngestConfig(concurrency=2))  # adds only what the lake lacks
    timings["ingest_s"] = time.perf_counter() - t
    torch.manual_seed(0)
    tokenizer = str(work / "tokenizer")
    if not (Path(tokenizer) / "config.json").exists():
        save_checkpoint(Tokenizer(TokenizerConfig(**TOKENIZER)), tokenizer, info={"note": "random init, loader benchmark"})
    t = time.perf_counter()
    tokenize_steps(lake, tokenizer, actors=2)  # what `gr2 tokenize` runs
    timings["tokenize_s"] = time.perf_counter() - t
    return result.funnel


# -- the loaders, round after round ------------------------------------------------------------------


MIN_BATCHES = 8  # per round, however slow the loader: a round of one or two batches says little


def timed_round(batches, seconds: float, drain: int) -> dict:
    """Samples one loader serves in about `seconds`, after taking (untimed) what its workers
    prefetched while the others ran."""
    for _ in range(drain):
        next(batches)
    samples, count, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or count < MIN_BATCHES:
        samples += len(next(batches)["index"])
        count += 1
    return {"samples": samples, "seconds": time.perf_counter() - t0}


class Gr2Loader:
    """A StepsDataset behind a DataLoader with persistent workers, shuffled with replacement forever."""

    def __init__(self, lake: str, serve: str, delta: dict, batch: int, workers: int, seed: int):
        import torch

        from gr2.robot.loader import StepsDataset

        t0 = time.perf_counter()
        dataset = StepsDataset(lake, delta, cameras=CAMERAS, serve=serve)
        self.made_s = time.perf_counter() - t0
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9,
                                                 generator=torch.Generator().manual_seed(seed))
        self.batches = iter(dataset.loader(batch_size=batch, sampler=sampler, num_workers=workers,
                                           persistent_workers=workers > 0))
        first = next(self.batches)
        self.info = {"frames": len(dataset), "episodes": dataset.num_episodes, "construct_s": self.made_s,
                     "first_batch_s": time.perf_counter() - t0,
                     "shapes": {k: list(v.shape) for k, v in first.items() if hasattr(v, "shape")}}
        self.drain = workers * 2

    def round(self, seconds: float) -> dict:
        return timed_round(self.batches, seconds, self.drain)


class LeRobotLoader:
    """LeRobot's LeRobotDataset in its own environment, driven one round at a time over a pipe."""

    def __init__(self, python: str, root: str, delta: dict, batch: int, workers: int, seed: int):
        if not Path(python).exists():
            sys.exit(f"{python} is missing: run `make lerobot-venv` first")
        self.proc = subprocess.Popen(
            [python, str(LEROBOT_BENCH), root, json.dumps(delta), str(batch), str(workers), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""})
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"LeRobot's loader stopped (exit {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def round(self, seconds: float) -> dict:
        self.proc.stdin.write(f"round {seconds}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def measure(built: dict, rounds: int, seconds: float, batch: int, workers: int, lerobot_python: str) -> dict:
    """Every loader's samples/s, round after round in turn; the median round of each."""
    delta = delta_timestamps(built["fps"])
    loaders = {
        "gr2 tokens": Gr2Loader(built["lake"], "tokens", delta, batch, workers, seed=0),
        "gr2 frames": Gr2Loader(built["lake"], "frames", delta, batch, workers, seed=0),
        "LeRobot frames": LeRobotLoader(lerobot_python, built["lerobot"], delta, batch, workers, seed=0),
    }
    runs = {name: [] for name in loaders}
    try:
        for r in range(rounds):
            for name, loader in loaders.items():
                got = loader.round(seconds)
                runs[name].append(got["samples"] / got["seconds"])
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.0f}/s" for n, v in runs.items()), flush=True)
    finally:
        loaders["LeRobot frames"].close()
    base = runs["LeRobot frames"]
    # Ratios per round: the loaders of one round shared the machine's load of that moment.
    return {name: {"samples_per_s": statistics.median(v), "rounds": [round(x, 1) for x in v],
                   "vs_lerobot": statistics.median(x / b for x, b in zip(v, base)), **loaders[name].info}
            for name, v in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="camera frame width and height, pixels")
    p.add_argument("--work", default=None, help="where the lake and its export live (reused when built)")
    p.add_argument("--lake", default=None, help="an existing tokenized lake with both cameras: export and measure it")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0, help="per loader per round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lerobot-python", default=str(LEROBOT_PYTHON), help="python of LeRobot's environment")
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gr2-loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    built = build(work, args.episodes, args.size, args.lake)
    if args.build_only:
        print(json.dumps(built, indent=1))
        return
    results = measure(built, args.rounds, args.seconds, args.batch, args.workers, args.lerobot_python)
    print(f"\n{built['episodes']} Meta-World episodes, {built['frames']} steps at {built['fps']} Hz, cameras "
          f"{', '.join(built['cameras'])} at {built['size']}px; batch {args.batch}, {args.workers} workers, "
          f"delta_timestamps {delta_timestamps(built['fps'])}")
    print(f"{'loader':<16}{'samples/s':>11}{'vs LeRobot':>12}{'first batch':>13}  samples/s per round")
    for name, r in results.items():
        print(f"{name:<16}{r['samples_per_s']:>11.0f}{r['vs_lerobot']:>11.2f}x{r['first_batch_s']:>12.1f}s  {r['rounds']}")
    print("samples/s: the median round; vs LeRobot: the median of the rounds' ratios; first batch: from making "
          "the dataset to its first batch (gr2's workers start by forkserver, LeRobot's by fork)")
    load = os.getloadavg()
    print(f"load average at the end (2 cores, shared): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "lake": {k: v for k, v in built.items() if k not in ("lake", "lerobot")},
        "batch": args.batch, "workers": args.workers, "rounds": args.rounds, "seconds_per_round": args.seconds,
        "delta_timestamps": delta_timestamps(built["fps"]), "loaders": results, "load_average_at_end": load,
        "cpus": os.cpu_count()}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
