"""Robot steps ingested per second per Ray worker: Meta-World episodes with two cameras, with and
without a VQ tokenizer, on 1 and 2 workers; then a re-ingest that must add nothing.

    .venv/bin/python benchmarks/robot_ingest.py [--episodes N] [--repeat N] [--tokenizer small|default]

Recording the episodes (MuJoCo + osmesa rendering) is timed separately: it is not ingest. The
tokenizer is random-init (its tokens mean nothing; the cost per frame is what is measured).
Each ingest is timed end to end (Ray Data actor start, a tokenizer load per actor, commits), best of
--repeat runs into fresh lakes; with few episodes that start-up is a large share, and the re-ingest
row, which decodes episodes to hash them but writes nothing, shows its size.
Prints a table and writes benchmarks/results/robot_ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "robot_ingest.json"
# Random-init tokenizers: "small" is the tests' size; "default" is TokenizerConfig() (f=8, 1024 codes).
TOKENIZERS = {
    "small": {"resolution": 64, "downsample": 8, "channels": 8, "z_channels": 16, "codebook_size": 256, "code_dim": 8},
    "default": {},
}


def record_episodes(out: str, episodes: int, size: int) -> dict:
    """Record `episodes` drawer-open episodes (on the running Ray, one simulator per task); timing and counts."""
    from gr2.sim.record import RecordConfig, record, truth

    t0 = time.perf_counter()
    info = record(out, RecordConfig(tasks=("drawer-open-v3",), episodes=episodes, seed=0, width=size, height=size))
    seconds = time.perf_counter() - t0
    eps = truth(out)["episodes"]
    rendered = sum(len(c["capture_step"]) + len(c["dropped_capture_step"]) for e in eps for c in e["cameras"].values())
    cams = info["gr2_recording"]["cameras"]
    return {"episodes": len(eps), "successful": sum(e["success"] for e in eps), "steps": info["total_frames"],
            "frames_rendered": rendered, "seconds": seconds, "s_per_episode": seconds / len(eps),
            "worker_s_per_episode": seconds * min(2, len(eps)) / len(eps),
            "cameras": {n: {"fps": c["fps"], "offset_s": c["offset_s"]} for n, c in cams.items()}, "size": size}


def make_tokenizer(directory: str, kind: str) -> dict:
    """A random-init tokenizer checkpoint at `directory`; its id and config."""
    import torch

    from gr2.tokenizers import Tokenizer, TokenizerConfig, save_checkpoint

    torch.manual_seed(0)
    config = TokenizerConfig(**TOKENIZERS[kind])
    cid = save_checkpoint(Tokenizer(config), directory, info={"note": "random init, robot_ingest benchmark"})
    return {"kind": f"{kind} (random init)", "checkpoint_id": cid, "config": config.to_dict()}


def ingest_once(dataset: str, lake_dir: str, workers: int, tokenizer: str | None) -> dict:
    from gr2.lake.lake import Lake
    from gr2.robot.ingest import IngestConfig, ingest

    lake = Lake(lake_dir)
    before = {t: lake.read(t, columns=[k]).num_rows for t, k in (("episodes", "episode_id"), ("steps", "step_id"))}
    t0 = time.perf_counter()
    result = ingest([dataset], lake, IngestConfig(concurrency=workers, tokenizer=tokenizer))
    seconds = time.perf_counter() - t0
    after = {t: lake.read(t, columns=[k]).num_rows for t, k in (("episodes", "episode_id"), ("steps", "step_id"))}
    f = result.funnel
    steps = f["steps_added"]
    tokenized = None
    if tokenizer and steps:
        views = lake.read("steps", columns=["views"]).column("views").to_pylist()
        tokenized = sum(1 for vs in views for v in vs if v["ok"] and v["tokens"])
    return {"workers": workers, "tokenizer": bool(tokenizer), "seconds": seconds, "steps_added": steps,
            "episodes": f["episodes"], "accepted": f["accepted"], "failed": f["failed"], "rejected": f["rejected"],
            "already_in_lake": f["already_in_lake"], "rows_before": before, "rows_after": after,
            "tokenized_views": tokenized, "steps_per_s": steps / seconds,
            "steps_per_s_per_worker": steps / seconds / workers, "reasons": result.reasons[:5]}


def quiet_local_environment() -> None:
    """Offline defaults, no progress bars, and a fresh local Ray (never a user's cluster)."""
    from gr2.flows.runtime import offline_defaults

    offline_defaults()  # no telemetry; MuJoCo through OSMesa
    os.environ["GR2_PROGRESS"] = "0"
    os.environ.pop("RAY_ADDRESS", None)


def main() -> None:
    quiet_local_environment()
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--size", type=int, default=128, help="camera frame width and height, pixels")
    p.add_argument("--repeat", type=int, default=2, help="ingests per setting (fresh lake each); the fastest is kept")
    p.add_argument("--tokenizer", choices=sorted(TOKENIZERS), default="small")
    args = p.parse_args()

    import ray

    from gr2.flows.runtime import ensure_ray

    ensure_ray(num_cpus=2)
    tmp = Path(tempfile.mkdtemp(prefix="gr2-robot-bench-"))
    try:
        dataset = str(tmp / "drawer")
        # Rendering happens in Ray workers that exit after their episode: osmesa never meets torch
        # in one process (DESIGN.md), so the driver may make the tokenizer afterwards.
        rec = record_episodes(dataset, args.episodes, args.size)
        tok = make_tokenizer(str(tmp / "tokenizer"), args.tokenizer)
        runs = []
        for tokenizer in (None, str(tmp / "tokenizer")):
            for workers in (1, 2):
                tries = [ingest_once(dataset, str(tmp / f"lake-{'tok' if tokenizer else 'plain'}-{workers}-{i}"), workers,
                                     tokenizer) for i in range(args.repeat)]
                best = min(tries, key=lambda r: r["seconds"])
                runs.append({"what": f"ingest{', tokenized' if tokenizer else ''}", **best,
                             "all_seconds": [round(r["seconds"], 2) for r in tries]})
        again = ingest_once(dataset, str(tmp / "lake-plain-2-0"), 2, None)
        runs.append({"what": "re-ingest (same lake)", **again})
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"recording: {rec['episodes']} drawer-open-v3 episodes ({rec['successful']} successful), {rec['steps']} steps, "
          f"{rec['frames_rendered']} frames rendered at {rec['size']}px on 2 Ray workers: {rec['seconds']:.1f} s, "
          f"{rec['s_per_episode']:.1f} s/episode wall, {rec['worker_s_per_episode']:.1f} worker-s/episode")
    print(f"tokenizer: {tok['kind']}, checkpoint {tok['checkpoint_id']}")
    print(f"{'what':<24}{'workers':>8}{'steps':>7}{'added':>7}{'seconds':>9}{'steps/s':>9}{'/s/worker':>10}"
          f"{'views tokenized':>16}  accounted")
    for r in runs:
        accounted = r["episodes"] == r["accepted"] + r["rejected"] + r["failed"]
        print(f"{r['what']:<24}{r['workers']:>8}{r['rows_after']['steps']:>7}{r['steps_added']:>7}{r['seconds']:>9.2f}"
              f"{r['steps_per_s']:>9.1f}{r['steps_per_s_per_worker']:>10.1f}{r['tokenized_views'] or '-':>16}  "
              f"{r['accepted']}+{r['rejected']}+{r['failed']}=={r['episodes']}: {accounted}")
    load = os.getloadavg()
    print(f"load average while measuring (2 cores, shared): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"re-ingest: {again['already_in_lake']} episodes already in the lake, steps added {again['steps_added']}, "
          f"rows {again['rows_before']} -> {again['rows_after']}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"recording": rec, "tokenizer": tok, "runs": runs, "repeat": args.repeat,
                               "cluster_cpus": 2, "load_average_at_end": load}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
