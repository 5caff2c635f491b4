"""`gr2 build-videos`, `gr2 status`, `gr2 serve`: the video build from the command line."""

from __future__ import annotations

import json

from gr2.flows.options import CommandError, read_settings
from gr2.video.config import BuildConfig


def load_config(path: str | None, overrides: dict | None = None) -> BuildConfig:
    """A BuildConfig from a YAML/JSON file (unknown keys are an error), with overrides applied."""
    data = read_settings(path)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return BuildConfig(**data)


def config_from_args(args) -> BuildConfig:
    """The BuildConfig the build flags ask for: --config, then the model and worker flags over it."""
    config = load_config(args.config, {
        "workers": args.workers, "clip_model": args.clip_model, "clip_pretrained": args.clip_pretrained,
        "caption_model": args.caption_model, "caption_pretrained": args.caption_pretrained, "tokenizer": args.tokenizer})
    for key, flag in (("clip_model", args.no_embed), ("caption_model", args.no_caption)):
        if flag:
            config = config.model_copy(update={key: None})
    return config


def build_videos(args) -> str:
    from gr2.flows.build import build_video_dataset, funnel_markdown

    config = config_from_args(args)
    result = build_video_dataset(sources=args.sources, lake=args.lake, config=config, retry_failed=args.retry_failed)
    return funnel_markdown(result["build_id"], result["funnel"]) + f"\nlake: {result['lake']}"


def compact(args) -> str:
    from datetime import timedelta

    from gr2.lake.lake import Lake

    lake = Lake(args.lake)
    if not lake.exists():
        raise CommandError(f"no lake at {lake.root}")
    if args.older_than_days < 0:
        raise CommandError(f"--older-than-days must be 0 or more (got {args.older_than_days:g})")
    done = lake.compact(older_than=timedelta(days=args.older_than_days))
    if args.json:
        return json.dumps(done, indent=2)
    lines = ["| table | fragments before | after | versions removed | MB freed | note |", "|---|---|---|---|---|---|"]
    for table, r in done.items():
        lines.append(f"| {table} | {r['fragments_before']} | {r['fragments_after']} | {r['versions_removed']} | "
                     f"{r['bytes_removed'] / 1e6:.1f} | {r.get('skipped', '')} |")
    return "\n".join(lines)


def status(args) -> str:
    from gr2.flows.build import funnel_markdown
    from gr2.lake.lake import Lake

    lake = Lake(args.lake)
    if not lake.exists():
        raise CommandError(f"no lake at {lake.root}")
    if args.failed:
        return failed_ledger(lake)
    build = lake.latest_build()
    if build is None:
        raise CommandError(f"lake {lake.root} has no finished build yet")
    if args.json:
        return json.dumps(build, default=str, indent=2)
    when = build["finished_at"].isoformat(timespec="seconds")
    if build["flow"] == "ingest-robot":
        from gr2.flows.robot import funnel_markdown as robot_funnel

        text = robot_funnel(build["build_id"], build["funnel"])
    else:
        text = funnel_markdown(build["build_id"], build["funnel"])
    return text + f"\n{build['flow']} finished {when}; versions {build['versions']}"


def failed_ledger(lake) -> str:
    """Failed inputs grouped by reason."""
    from gr2.video.build import latest_by_uri

    failed = [r for r in latest_by_uri(lake).values() if r["status"] == "failed"]
    if not failed:
        return "no failed inputs"
    groups: dict[str, list[str]] = {}
    for row in failed:
        groups.setdefault((row["reason"] or "").replace(row["uri"], "<uri>"), []).append(row["uri"])
    lines = [f"{len(failed)} failed inputs"]
    for reason, uris in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"\n{len(uris)} x {reason}")
        lines += [f"    {u}" for u in uris]
    return "\n".join(lines)


def scheduled_deployment(args):
    """The build as a Prefect deployment on a cron schedule (validated before anything is served)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from gr2.flows.build import BuildParams, build_video_dataset

    try:
        CronSchedule(cron=args.cron)
    except ValidationError:
        raise CommandError(f"--cron {args.cron!r} is not a cron expression (e.g. \"0 3 * * *\")") from None
    params = BuildParams(sources=args.sources, lake=args.lake, config=config_from_args(args))
    # Scheduled builds retry: a build that failed half-way resumes on the retry (nothing twice).
    flow = build_video_dataset.with_options(retries=2, retry_delay_seconds=60)
    return flow.to_deployment(
        name=args.name, cron=args.cron,
        parameters={"sources": params.sources, "lake": params.lake, "config": params.config.model_dump()},
    )


def serve(args) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(scheduled_deployment(args))


def add_config_flags(p) -> None:
    """The flags `config_from_args` reads: the same for a build now and a scheduled one."""
    p.add_argument("--config", help="YAML/JSON file of BuildConfig settings")
    p.add_argument("--workers", type=int, help="parallel decode tasks (default: all CPUs)")
    p.add_argument("--clip-model", help="open_clip model for embeddings (default ViT-B-32)")
    p.add_argument("--clip-pretrained", help="open_clip tag in the local cache, a checkpoint file, or none (random init)")
    p.add_argument("--caption-model", help="CoCa model for clips without a caption (default coca_ViT-B-32)")
    p.add_argument("--caption-pretrained", help="as --clip-pretrained, for the captioner")
    p.add_argument("--no-embed", action="store_true", help="no embeddings (and so no dedup, no text search)")
    p.add_argument("--no-caption", action="store_true", help="no generated captions (uncaptioned clips are flagged)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint id (default: the lake's latest)")


def register(sub) -> None:
    p = sub.add_parser("build-videos", help="build (or extend) a lake of video clips from sources")
    p.add_argument("--lake", required=True, help="lake root: a directory or s3://bucket/prefix")
    p.add_argument("sources", nargs="+", help="directories, globs, manifests (.csv/.jsonl/.parquet), URIs")
    add_config_flags(p)
    p.add_argument("--retry-failed", action="store_true", help="retry inputs whose last outcome was failed")
    p.set_defaults(run=build_videos)

    p = sub.add_parser("status", help="the funnel of the lake's latest build (videos or robot)")
    p.add_argument("--lake", required=True)
    p.add_argument("--failed", action="store_true", help="list failed inputs grouped by reason")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=status)

    p = sub.add_parser("compact", help="fold small fragments, update indexes, drop old untagged versions")
    p.add_argument("--lake", required=True)
    p.add_argument("--older-than-days", type=float, default=7.0,
                   help="delete versions (and unreferenced files) older than this that no build tag holds (default 7; "
                        "0 only while no build or ingest is writing to the lake)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=compact)

    p = sub.add_parser("serve", help="serve the build on a cron schedule (Prefect serve)")
    p.add_argument("--lake", required=True)
    p.add_argument("sources", nargs="+")
    p.add_argument("--cron", required=True, help='e.g. "0 3 * * *"')
    p.add_argument("--name", default="scheduled-build", help="the deployment's name (default scheduled-build)")
    add_config_flags(p)
    p.set_defaults(run=serve)
