"""`gr2 serve` against a real Prefect server: the deployment is registered, a run started through
Prefect's API is picked up and completes, its funnel artifact is read back, and the server stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from gr2.lake.lake import Lake

DEPLOYMENT = "build-video-dataset/nightly"


def _serve(args, env_extra, log_path):
    """`gr2 serve ...` as its own process (it blocks serving), its output to `log_path`."""
    env = {**os.environ, "GR2_PROGRESS": "0", **env_extra}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "gr2.flows", "serve", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait(what, check, proc, log_path, deadline_s=900.0, every_s=2.0):
    """Poll `check()` until it returns something truthy; fail early, with the log, if `proc` died."""
    end = time.monotonic() + deadline_s  # a bound so a broken run cannot hang the suite; never asserted on
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        assert proc.poll() is None, f"gr2 serve exited ({proc.returncode}) waiting for {what}:\n" + log_path.read_text()[-4000:]
        time.sleep(every_s)
    raise AssertionError(f"no {what} after {deadline_s:.0f} s:\n" + log_path.read_text()[-4000:])


async def _deployment(name):
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


async def _flow_run(run_id):
    from prefect import get_client

    async with get_client() as client:
        return await client.read_flow_run(run_id)


async def _funnel_artifacts(run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["video-build-funnel"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def test_a_run_started_through_prefect_is_built_by_gr2_serve_and_its_funnel_read_back(prefect_server, media, tmp_path):
    from prefect.deployments import run_deployment

    lake_dir = str(tmp_path / "lake")
    log_path = tmp_path / "serve.log"
    sources = [str(media["cut"]), str(media["webm"]), str(media["text"])]
    # The runner asks the server for due runs every PREFECT_RUNNER_POLL_FREQUENCY seconds (10 by default).
    proc = _serve(["--lake", lake_dir, *sources, "--cron", "0 3 * * *", "--name", "nightly",
                   "--workers", "1", "--no-embed", "--no-caption"],
                  {"PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}, log_path)
    try:
        deployment = _wait("deployment", lambda: asyncio.run(_deployment(DEPLOYMENT)), proc, log_path)
        assert deployment.schedules[0].schedule.cron == "0 3 * * *"
        assert deployment.parameters["lake"] == lake_dir and deployment.parameters["sources"] == sources
        assert deployment.parameters["config"]["clip_model"] is None

        run = run_deployment(DEPLOYMENT, timeout=0)  # returns at once: the serve process must pick it up
        run = _wait("finished flow run", lambda: (r := asyncio.run(_flow_run(run.id))).state.is_final() and r,
                    proc, log_path)
        assert run.state.is_completed(), f"{run.state}\n" + log_path.read_text()[-4000:]

        build = Lake(lake_dir).latest_build()
        videos = Lake(lake_dir).read("videos").to_pylist()
        accepted = sum(v["status"] == "accepted" for v in videos)
        assert len(videos) == 3 and accepted == 2, [(v["uri"], v["status"], v["reason"]) for v in videos]

        artifacts = asyncio.run(_funnel_artifacts(run.id))
        assert len(artifacts) == 1
        markdown = artifacts[0].data
        assert f"### Build `{build['build_id']}`" in markdown
        assert "| inputs | 3 |" in markdown and f"| accepted | {accepted} |" in markdown
        assert "| failed | 1 |" in markdown
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # what a service manager sends
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("gr2 serve did not exit on SIGTERM:\n" + log_path.read_text()[-4000:]) from None
    assert proc.returncode == 0, log_path.read_text()[-4000:]
    # Prefect pauses a served deployment's schedule when its server stops: no nightly runs pile up unserved.
    assert asyncio.run(_deployment(DEPLOYMENT)).paused
