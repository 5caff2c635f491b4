"""The video build flow: sources -> clips in the lake, with a funnel artifact."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field, field_validator

from gr2.flows.runtime import ensure_ray
from gr2.lake.index import build_indexes
from gr2.lake.lake import Lake
from gr2.lake.query import sql_literal
from gr2.video import caption, dedup
from gr2.video import sources as sources_mod
from gr2.video.build import BuildResult, check_models, model_stages, new_build_id, run_build
from gr2.video.config import BuildConfig
from gr2.video.tokenize import build_stages, tokenize_after_build


class BuildParams(BaseModel):
    """The flow's parameters, validated before any work starts."""

    sources: list[str] = Field(min_length=1)
    lake: str = Field(min_length=1)
    config: BuildConfig = BuildConfig()
    retry_failed: bool = False

    @field_validator("sources")
    @classmethod
    def _no_blank_sources(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("a source is blank")
        return v


def fractional(stages, cpus: float = 0.25) -> list:
    """Actor stages holding a fraction of a CPU (see build.model_stages for why)."""
    return [(stage, {**kwargs, "num_cpus": kwargs.get("num_cpus", cpus)}) for stage, kwargs in stages]


def model_counts(lake: Lake, build_id: str) -> dict:
    """Caption sources and near-duplicates among this build's clips, for the funnel."""
    if not lake.exists("clips"):
        return {}
    rows = lake.read("clips", columns=["caption_source", "duplicate_of"], filter=f"build_id = {sql_literal(build_id)}").to_pylist()
    return {**caption.counts(rows), **dedup.counts(rows)}


def funnel_markdown(build_id: str, funnel: dict) -> str:
    """The funnel as a markdown table: what people read in Prefect's UI and in `gr2 status`."""
    rows = [("inputs", funnel["inputs"]), ("accepted", funnel["accepted"]),
            ("rejected", funnel["rejected"]), ("failed", funnel["failed"])]
    rows += [(f"rejected: {k}", v) for k, v in sorted(funnel.get("rejected_by_reason", {}).items())]
    rows += [(f"failed: {k}", v) for k, v in sorted(funnel.get("failed_by_reason", {}).items())]
    if "retried" in funnel:
        rows += [("retried (failed before)", funnel["retried"])]
        rows += [(f"retried -> {k}", v) for k, v in sorted(funnel.get("retried_outcomes", {}).items())]
    rows += [("already in the lake (skipped)", funnel.get("skipped_already_in_lake", 0)),
             ("clips", funnel.get("clips", 0)), ("clips accepted", funnel.get("clips_accepted", 0)),
             ("clips rejected", funnel.get("clips_rejected", 0)), ("clips failed", funnel.get("clips_failed", 0))]
    rows += [(f"clips {k}", v) for k, v in sorted(funnel.get("clips_by_reason", {}).items())]
    rows += [(k, funnel[k]) for k in ("video_seconds", "frames_decoded", "elapsed_s", "videos_per_s", "frames_per_s")
             if k in funnel]
    rows += [(k, v) for k, v in funnel.items() if k.startswith(("caption", "dedup", "tokeniz", "embed"))]
    if "indexes" in funnel:
        rows += [("indexes", str(funnel["indexes"]).replace("|", "/"))]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"### Build `{build_id}`\n\n| stage | count |\n|---|---|\n{body}\n"


def record_build(lake: Lake, result: BuildResult, flow_name: str, sources: list[str], config_json: str,
                 config_hash: str, started: datetime, tables: tuple[str, ...]) -> None:
    """Tag every table this build touched with the build id and write its row in `builds`."""
    for table in tables:
        if lake.exists(table):
            lake.tag(table, result.build_id)
            result.versions[table] = lake.dataset(table).version
    lake.commit("builds", [{
        "build_id": result.build_id, "flow": flow_name, "started_at": started,
        "finished_at": datetime.now(timezone.utc), "sources": sources, "config_json": config_json,
        "config_hash": config_hash, "funnel_json": json.dumps(result.funnel), "versions_json": json.dumps(result.versions),
    }])


@flow(name="build-video-dataset", log_prints=True)
def build_video_dataset(sources: list[str], lake: str, config: BuildConfig = BuildConfig(),
                        retry_failed: bool = False) -> dict:
    """Filter, cut and gate web video from `sources` into the lake at `lake`; returns the funnel."""
    params = BuildParams(sources=sources, lake=lake, config=config, retry_failed=retry_failed)
    logger = get_run_logger()
    ensure_ray()
    started = datetime.now(timezone.utc)
    the_lake = Lake(params.lake, lease_timeout_s=params.config.lease_timeout_s)
    check_models(params.config, the_lake)
    tokenize = build_stages(the_lake, params.config.tokenizer)  # loads and checks the checkpoint now
    inputs = sources_mod.list_inputs(params.sources)
    build_id = new_build_id()
    result = run_build(inputs, the_lake, params.config, build_id=build_id, retry_failed=params.retry_failed,
                       extra_stages=model_stages(the_lake, params.config) + fractional(tokenize), log=logger.info)
    result.funnel.update(model_counts(the_lake, build_id))
    result.funnel.update(tokenize_after_build(the_lake, tokenize, build_id, log=logger.info))
    if the_lake.exists("clips"):
        result.funnel["indexes"] = build_indexes(the_lake)
    record_build(the_lake, result, "build-videos", params.sources, params.config.model_dump_json(),
                 params.config.hash(), started, ("videos", "clips"))
    create_markdown_artifact(key="video-build-funnel", markdown=funnel_markdown(result.build_id, result.funnel),
                             description=f"funnel of {result.build_id}")
    logger.info(f"{result.build_id}: {result.funnel['accepted']} accepted, {result.funnel['rejected']} rejected, "
                f"{result.funnel['failed']} failed of {result.funnel['inputs']} inputs")
    return {"build_id": result.build_id, "lake": the_lake.root, "funnel": result.funnel, "versions": result.versions}
