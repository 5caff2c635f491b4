"""The streaming build beside a baseline revision's (default: `main`, the build that hashed, then
surveyed, every input before cutting a clip), in one run: total seconds, seconds to the first committed
clip, and the driver's peak memory, for N and 4N inputs.

    .venv/bin/python benchmarks/build_streaming.py [--n 50] [--baseline main] [--repeat 1]

Inputs are one small ffmpeg test video (testsrc 128x96, 10 fps, 4 s: two 2 s clips) remuxed into
distinct files (a metadata tag makes distinct bytes, so distinct video ids). Each build runs in a
process of its own with a 2-CPU local Ray, so the driver's peak RSS (getrusage) is that build's. The
streaming build is this checkout's `src`; the baseline is `git archive <baseline> src` unpacked in a
temp directory, each put first on the child's PYTHONPATH. Builds alternate (streaming, baseline, ...)
so a machine's slow minute falls on both. Models off, as in build_throughput.py; commit_every=16.
Prints a table and writes benchmarks/results/build_streaming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "build_streaming.json"
REPO = Path(__file__).resolve().parent.parent
CONFIG = dict(workers=2, clip_model=None, caption_model=None, fingerprint_max_bits=None, commit_every=16)


def make_inputs(n: int, into: str) -> list[str]:
    """`n` distinct small videos: one encode, remuxed `n` times with a different comment tag."""
    base = os.path.join(into, "base.mp4")
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=128x96:rate=10:duration=4",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", base], check=True)
    out = []
    for i in range(n):
        dst = os.path.join(into, f"v{i:05d}.mp4")
        subprocess.run(["ffmpeg", "-v", "error", "-i", base, "-c", "copy", "-metadata", f"comment=input {i}", dst],
                       check=True)
        out.append(dst)
    return out


def one_build(sources_file: str) -> dict:
    """Run in a child process: one build over the listed inputs; what it measured, as a dict."""
    import resource
    from datetime import timezone

    from gr2.flows.runtime import ensure_ray
    from gr2.lake.lake import Lake
    from gr2.video.build import run_build
    from gr2.video.config import BuildConfig

    sources = Path(sources_file).read_text().split()
    ensure_ray(num_cpus=2)
    lake = Lake(tempfile.mkdtemp())
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # imports and Ray joined, no build yet
    t0 = time.time()
    result = run_build(sources, lake, BuildConfig(**CONFIG), log=lambda *_: None)
    total = time.time() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Lance stamps each version in UTC (naive): version 1 of clips is the first clip commit.
    first = lake.dataset("clips").versions()[0]["timestamp"].replace(tzinfo=timezone.utc).timestamp()
    f = result.funnel
    return {"inputs": len(sources), "clips": f["clips"], "accepted": f["accepted"], "total_s": round(total, 2),
            "first_clip_s": round(first - t0, 2), "first_clip_fraction": round((first - t0) / total, 3),
            "driver_peak_rss_mb": round(peak_kb / 1024, 1), "driver_rss_before_build_mb": round(before_kb / 1024, 1),
            "driver_rss_growth_mb": round((peak_kb - before_kb) / 1024, 1)}


def run_child(src: str, sources: list[str], tmp: str) -> dict:
    listing = os.path.join(tmp, f"inputs-{len(sources)}.txt")
    Path(listing).write_text("\n".join(sources))
    env = {**os.environ, "PYTHONPATH": src, "GR2_PROGRESS": "0"}
    out = subprocess.run([sys.executable, __file__, "--child", listing], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"build under {src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_src(ref: str, into: str) -> str:
    """The `src` tree of revision `ref`, unpacked under `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return os.path.join(into, "src")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--baseline", default="main", help="git revision to compare with ('' for none)")
    p.add_argument("--repeat", type=int, default=1, help="builds of each kind and size")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_build(args.child)))
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_inputs(4 * args.n, tmp)
        variants = {"streaming": str(REPO / "src")}
        if args.baseline:
            variants[f"baseline ({args.baseline})"] = baseline_src(args.baseline, tmp)
        runs = [{"build": name, **run_child(src, paths[:n], tmp)}
                for n in (args.n, 4 * args.n) for _ in range(args.repeat) for name, src in variants.items()]
    print(f"{'build':<20}{'inputs':>7}{'clips':>7}{'total s':>9}{'1st clip s':>11}{'fraction':>9}"
          f"{'peak RSS MB':>12}{'growth MB':>10}")
    for r in runs:
        print(f"{r['build']:<20}{r['inputs']:>7}{r['clips']:>7}{r['total_s']:>9.1f}{r['first_clip_s']:>11.1f}"
              f"{r['first_clip_fraction']:>9.2f}{r['driver_peak_rss_mb']:>12.1f}{r['driver_rss_growth_mb']:>10.1f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "machine": "2 cores, shared and noisy: absolute numbers are this machine's",
        "inputs": "testsrc 128x96 10 fps 4 s (libx264), remuxed into distinct files",
        "config": f"BuildConfig(**{CONFIG})",
        "method": "each build in its own process with a 2-CPU local Ray; total_s: run_build wall time; first_clip_s: "
                  "from run_build's start to the clips table's version 1 (the first clip commit); driver RSS: "
                  "getrusage ru_maxrss of the driver process, before the build and at its end (growth = the "
                  "difference)",
        "command": f"benchmarks/build_streaming.py --n {args.n} --baseline {args.baseline!r} --repeat {args.repeat}",
        "runs": runs,
    }, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
