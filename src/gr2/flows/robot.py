"""The robot-trajectory flow (`gr2 ingest-robot`) and the Meta-World recorder (`gr2 record-metaworld`)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, field_validator

from gr2.flows.params import LakeRoot, Sources
from gr2.robot.ingest import IngestConfig

FLOW_NAME = "ingest-robot"


class IngestRobotParams(BaseModel):
    """The flow's parameters, validated before any work starts (pydantic checks the dataclass too)."""

    sources: Sources
    lake: LakeRoot
    config: IngestConfig = IngestConfig()

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
    if funnel.get("doctor"):
        text += "\n**Doctor** (`gr2 doctor --lake ...` for each finding)\n\n"
        for dataset, found in sorted(funnel["doctor"].items()):
            checks = ", ".join(f"{k} {v}" for k, v in found.items() if k not in ("episodes", "with_findings", "skipped"))
            said = found.get("skipped") or (f"{found['with_findings']} of {found['episodes']} episodes with findings"
                                            + (f": {checks}" if checks else ""))
            text += f"- {dataset}: {said}\n"
    if reasons:
        text += "\n**Not accepted**\n\n" + "\n".join(f"- {r}" for r in reasons[:50]) + "\n"
        if len(reasons) > 50:
            text += f"- ... and {len(reasons) - 50} more\n"
    return text


@flow(name="ingest-robot-trajectories", log_prints=True)
def ingest_robot_trajectories(sources: list[str], lake: str, config: IngestConfig = IngestConfig()) -> dict:
    """Robot episodes from `sources` into the lake's episodes and steps tables; returns the funnel."""
    from gr2.flows.runtime import ensure_ray
    from gr2.lake.lake import COMPACT_AT_FRAGMENTS, Lake
    from gr2.robot.doctor import summary as doctor_summary
    from gr2.robot.ingest import ingest

    params = IngestRobotParams(sources=sources, lake=lake, config=config)
    logger = get_run_logger()
    ensure_ray()
    started = datetime.now(timezone.utc)
    the_lake = Lake(params.lake)
    result = ingest(params.sources, the_lake, params.config, build_id=started.strftime("robot-%Y%m%dT%H%M%S%fZ"))
    result.funnel["compaction"] = the_lake.compact(("episodes", "steps"), min_fragments=COMPACT_AT_FRAGMENTS)
    result.funnel["doctor"] = doctor_summary(the_lake, sorted(result.stats))
    versions = the_lake.record_build(result.build_id, FLOW_NAME, params.sources,
                                     json.dumps(asdict(params.config), default=list), params.config.hash(),
                                     result.funnel, started, ("episodes", "steps"))
    create_markdown_artifact(key="robot-ingest-funnel", markdown=funnel_markdown(result.build_id, result.funnel, result.reasons),
                             description=f"funnel of {result.build_id}")
    f = result.funnel
    logger.info(f"{result.build_id}: {f['accepted']} accepted, {f['rejected']} rejected, {f['failed']} failed "
                f"of {f['episodes']} episodes; {f['steps_added']} steps added")
    return {"build_id": result.build_id, "lake": the_lake.root, "funnel": f, "versions": versions,
            "stats": result.stats}
