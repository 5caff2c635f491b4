"""Share of state steps alignment flags on streams with no frame missing: each should be 0.

    .venv/bin/python benchmarks/align_flags.py [--episodes N] [--recorded DIR]

The cameras run on the Meta-World recorder's own capture schedule (sim/record.py: its default
cameras, their rates, phases, jitter and the snap to the 12.5 ms env step) with drops=0, so every
flagged step is an on-time frame flagged as a gap. States at the recorder's 80 Hz and at the 20 Hz
ingest decimates to (IngestConfig(max_step_hz=20) in the tests). Synthetic schedules need no
rendering; --recorded DIR aligns a real recording (sim/record.py) too (recorded with drops=0, its
flags are all on-time frames as well).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from gr2.robot.align import align
from gr2.robot.episode import ArrayFrames, Camera, Episode, EpisodeRef
from gr2.sim.record import RecordConfig, capture_schedule

DT = 0.0125  # Meta-World's control period


def scheduled_episode(config: RecordConfig, length: int, seed: int) -> Episode:
    """An episode whose cameras are stamped on the recorder's schedule (no frames are decoded)."""
    rng = np.random.default_rng(seed)
    cameras = {}
    for spec in config.cameras:
        steps, _ = capture_schedule(spec, DT, length, rng)
        cameras[spec.name] = Camera(spec.name, steps * DT + spec.offset_s, ArrayFrames(np.zeros((len(steps), 1, 1, 3), np.uint8)),
                                    spec.fps, spec.offset_s)
    t = np.arange(length) * DT
    ref = EpisodeRef("schedule", "mem://schedule", f"episode_{seed}", tuple(cameras))
    return Episode(ref, "", t, np.zeros((length, 1)), np.zeros((length, 1)), cameras)


def flagged_share(episodes: list[Episode], every: int = 1) -> dict[str, tuple[float, float]]:
    """Per camera, the share of state steps flagged: between its first and last frame, and at all.

    States are decimated to every `every`-th step. Steps before a camera's first frame or after its
    last are flagged when farther than the tolerance from it: the stream starts at its own phase.
    """
    counts: dict[str, np.ndarray] = {}
    for episode in episodes:
        episode = episode.every(every)
        for view in align(episode).views:
            frame_t = episode.cameras[view.camera].timestamps_s - view.report["offset_s"]
            inside = (episode.timestamps_s >= frame_t[0]) & (episode.timestamps_s <= frame_t[-1])
            counts.setdefault(view.camera, np.zeros(4, np.int64))[:] += [
                (~view.ok & inside).sum(), inside.sum(), (~view.ok).sum(), len(view.ok)]
    return {name: (c[0] / c[1], c[2] / c[3]) for name, c in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--recorded", help="a dataset sim/record.py wrote")
    args = parser.parse_args()
    config = RecordConfig()
    on_time = replace(config, cameras=tuple(replace(c, drops=0) for c in config.cameras))
    rng = np.random.default_rng(0)
    episodes = [scheduled_episode(on_time, int(rng.integers(60, 201)), seed) for seed in range(args.episodes)]
    for hz, every in (("80 Hz", 1), ("20 Hz", 4)):
        print(f"recorder schedule, no drops, {len(episodes)} episodes, states at {hz}: " + report(flagged_share(episodes, every)))
    if args.recorded:
        from gr2.robot import lerobot

        recorded = [lerobot.load_episode(r) for r in lerobot.list_episodes(args.recorded)]
        for hz, every in (("80 Hz", 1), ("20 Hz", 4)):
            print(f"{args.recorded}, {len(recorded)} episodes, states at {hz}: " + report(flagged_share(recorded, every)))


def report(shares: dict[str, tuple[float, float]]) -> str:
    return "; ".join(f"{name} flagged {100 * inner:.2f}% between its first and last frame, {100 * whole:.2f}% in all"
                     for name, (inner, whole) in shares.items())


if __name__ == "__main__":
    main()
