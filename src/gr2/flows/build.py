"""The video build flow: sources -> clips in the lake, with a funnel artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from gr2.flows.params import LakeRoot, Sources
from gr2.flows.runtime import ensure_ray
from gr2.lake.lake import Lake
from gr2.video.build import run_build
from gr2.video.config import BuildConfig


class BuildParams(BaseModel):
    """The flow's parameters, validated before any work starts."""

    sources: Sources
    lake: LakeRoot
    config: BuildConfig = BuildConfig()
    retry_failed: bool = False


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
        made = ", ".join(funnel["indexes"].get("scalar", [])) or "none new"
        rows += [("vector index", funnel["indexes"].get("vector", "")), ("scalar indexes made", made)]
    folded = {t: r for t, r in funnel.get("compaction", {}).items() if r.get("fragments_before") != r.get("fragments_after")}
    if folded:
        rows += [("compacted", ", ".join(f"{t} {r['fragments_before']} -> {r['fragments_after']} fragments"
                                         for t, r in folded.items()))]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"### Build `{build_id}`\n\n| stage | count |\n|---|---|\n{body}\n"


@flow(name="build-video-dataset", log_prints=True)
def build_video_dataset(sources: list[str], lake: str, config: BuildConfig = BuildConfig(),
                        retry_failed: bool = False) -> dict:
    """Filter, cut and gate web video from `sources` into the lake at `lake`; returns the funnel."""
    params = BuildParams(sources=sources, lake=lake, config=config, retry_failed=retry_failed)
    logger = get_run_logger()
    ensure_ray()
    the_lake = Lake(params.lake, lease_timeout_s=params.config.lease_timeout_s)
    result = run_build(params.sources, the_lake, params.config, retry_failed=params.retry_failed, log=logger.info)
    create_markdown_artifact(key="video-build-funnel", markdown=funnel_markdown(result.build_id, result.funnel),
                             description=f"funnel of {result.build_id}")
    logger.info(f"{result.build_id}: {result.funnel['accepted']} accepted, {result.funnel['rejected']} rejected, "
                f"{result.funnel['failed']} failed of {result.funnel['inputs']} inputs")
    return {"build_id": result.build_id, "lake": the_lake.root, "funnel": result.funnel, "versions": result.versions}
