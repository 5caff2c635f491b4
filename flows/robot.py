"""The robot-trajectory flow (`gr2 ingest-robot`) and the Meta-World recorder (`gr2 record-metaworld`)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field, field_validator

from gr2.pipelines.robot.ingest import IngestConfig

FLOW_NAME = "ingest-robot"


class IngestRobotParams(BaseModel):
    """The flow's parameters, validated before any work starts (pydantic checks the dataclass too)."""

    sources: list[str] = Field(min_length=1)
    lake: str = Field(min_length=1)
    config: IngestConfig = IngestConfig()

    @field_validator("sources")
    @classmethod
    def _no_blank_sources(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("a source is blank")
        return v

    @field_validator("config", mode="before")
    @classmethod
    def _known_settings(cls, v):
        if isinstance(v, dict):
            unknown = set(v) - {f.name for f in fields(IngestConfig)}
            if unknown:
                raise ValueError(f"unknown settings {sorted(unknown)}")
        return v


def funnel_markdown(build_id: str, funnel: dict, reasons: list[str] | None = None) -> str:
    """The episode funnel as markdown: the Prefect artifact and what the CLI prints."""
    rows = [(k, funnel.get(k, 0)) for k in ("episodes", "accepted", "rejected", "failed", "new",
                                              "already_in_lake", "steps_added", "flagged_steps_added")]
    rows += [(f"offset {source} {camera}", f"{offset * 1000:.1f} ms (estimated)")
             for source, cams in sorted(funnel.get("offsets_estimated", {}).items()) for camera, offset in sorted(cams.items())]
    body = "\n".join(f"| {k.replace('_', ' ')} | {v} |" for k, v in rows)
    text = f"### Robot ingest `{build_id}`\n\n| episodes | count |\n|---|---|\n{body}\n"
    if reasons:
        text += "\n**Not accepted**\n\n" + "\n".join(f"- {r}" for r in reasons[:50]) + "\n"
        if len(reasons) > 50:
            text += f"- ... and {len(reasons) - 50} more\n"
    return text


@flow(name="ingest-robot-trajectories", log_prints=True)
def ingest_robot_trajectories(sources: list[str], lake: str, config: IngestConfig = IngestConfig()) -> dict:
    """Robot episodes from `sources` into the lake's episodes and steps tables; returns the funnel."""
    from gr2.flows.build import record_build
    from gr2.flows.runtime import ensure_ray
    from gr2.pipelines.lake import Lake
    from gr2.pipelines.robot.ingest import ingest

    params = IngestRobotParams(sources=sources, lake=lake, config=config)
    logger = get_run_logger()
    ensure_ray()
    started = datetime.now(timezone.utc)
    the_lake = Lake(params.lake)
    result = ingest(params.sources, the_lake, params.config, build_id=started.strftime("robot-%Y%m%dT%H%M%S%fZ"))
    record_build(the_lake, result, FLOW_NAME, params.sources, json.dumps(asdict(params.config), default=list),
                 params.config.config_hash(), started, ("episodes", "steps"))
    create_markdown_artifact(key="robot-ingest-funnel", markdown=funnel_markdown(result.build_id, result.funnel, result.reasons),
                             description=f"funnel of {result.build_id}")
    f = result.funnel
    logger.info(f"{result.build_id}: {f['accepted']} accepted, {f['rejected']} rejected, {f['failed']} failed "
                f"of {f['episodes']} episodes; {f['steps_added']} steps added")
    return {"build_id": result.build_id, "lake": the_lake.root, "funnel": f, "versions": result.versions,
            "stats": result.stats}


# -- the command line ---------------------------------------------------------------------------------


def _offsets(pairs: list[str] | None) -> dict[str, float]:
    from gr2.flows.cli import CommandError

    out = {}
    for pair in pairs or []:
        name, _, value = pair.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise CommandError(f"--offset {pair!r}: expected CAMERA=SECONDS, e.g. corner=0.03") from None
    return out


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def ingest_robot(args) -> str:
    from gr2.flows.cli import read_settings

    data = read_settings(args.config)
    overrides = {
        "cameras": _csv(args.cameras) or None,
        "offsets_s": {**data.get("offsets_s", {}), **_offsets(args.offset)} or None,
        "estimate_cameras": _csv(args.estimate_offsets) or None,
        "max_step_hz": args.max_step_hz,
        "tokenizer": args.tokenizer,
        "concurrency": args.workers,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = IngestRobotParams(sources=args.sources, lake=args.lake, config=data).config
    result = ingest_robot_trajectories(sources=args.sources, lake=args.lake, config=config)
    return funnel_markdown(result["build_id"], result["funnel"]) + f"\nlake: {result['lake']}"


def record_metaworld(args) -> str:
    from gr2.flows.cli import CommandError
    from gr2.pipelines.robot.record_metaworld import RecordConfig, RecordError, record

    tasks = _csv(args.tasks)
    if not tasks:
        raise CommandError("--tasks: name at least one Meta-World task, e.g. drawer-open-v3")
    config = RecordConfig(tasks=tasks, episodes=args.episodes, seed=args.seed, width=args.size, height=args.size,
                          declare_latency=not args.hide_latency)
    if args.workers and args.workers > 1:
        from gr2.flows.runtime import ensure_ray

        ensure_ray(num_cpus=args.workers)
    try:
        info = record(args.out, config)
    except RecordError as e:
        raise CommandError(str(e)) from None
    eps = info["gr2_recording"]["episodes"]
    ok = sum(e["success"] for e in eps)
    cams = ", ".join(f"{c['name']} {c['fps']:g} Hz +{c['offset_s'] * 1000:.0f} ms" for c in info["gr2_recording"]["cameras"].values())
    return f"recorded {len(eps)} episodes ({ok} successful, {info['total_frames']} steps) to {args.out}; cameras: {cams}"


def register(sub) -> None:
    p = sub.add_parser("ingest-robot", help="ingest robot episodes (LeRobot, HDF5, CALVIN, annotated JSON) into a lake")
    p.add_argument("--lake", required=True, help="lake root: a directory or s3://bucket/prefix")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="dataset directories or HDF5 files, local or s3://bucket/prefix")
    p.add_argument("--config", help="YAML/JSON file of IngestConfig settings")
    p.add_argument("--cameras", help="views to keep, in order, comma-separated (default: all)")
    p.add_argument("--offset", action="append", metavar="CAMERA=SECONDS", help="a camera's latency (repeatable)")
    p.add_argument("--estimate-offsets", metavar="CAMERAS", help="cameras whose latency to estimate ('*': all)")
    p.add_argument("--max-step-hz", type=float, help="decimate faster state streams to this rate")
    p.add_argument("--tokenizer", help="tokenizer checkpoint directory: also write per-view token grids")
    p.add_argument("--workers", type=int, help="parallel episode workers (default 2)")
    p.set_defaults(run=ingest_robot)

    p = sub.add_parser("record-metaworld", help="record Meta-World expert episodes as a multi-camera LeRobot dataset")
    p.add_argument("--out", required=True, help="a new directory for the dataset")
    p.add_argument("--tasks", default="drawer-open-v3", help="comma-separated Meta-World v3 tasks")
    p.add_argument("--episodes", type=int, default=2, help="episodes per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="frame width and height in pixels")
    p.add_argument("--hide-latency", action="store_true", help="do not declare camera latencies in info.json")
    p.add_argument("--workers", type=int, help="record episodes in parallel on a local Ray")
    p.set_defaults(run=record_metaworld)
