"""Re-make the README's pictures of the nightly build in Prefect's UI.

Starts a Prefect server in a temporary PREFECT_HOME, serves the build with `gr2 serve` (the demo's
Something-Something V2 clips, no models), runs the deployment once through Prefect's API, and has
headless Chromium photograph the deployment page and the run's funnel artifact:

    .venv/bin/python docs/make_prefect_screenshot.py [--port 4200]

Writes docs/prefect-nightly-build.png and docs/prefect-build-funnel.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
DEPLOYMENT = "build-video-dataset/nightly"


def wait_for(what: str, check, timeout_s: float = 600.0, every_s: float = 2.0):
    """Poll `check()` until it returns something truthy."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(every_s)
    raise SystemExit(f"gave up waiting for {what} after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def screenshot(url: str, out: Path, profile: Path) -> None:
    """Headless Chromium's picture of `url`; the virtual time budget lets the UI fetch and draw."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt package `chromium`)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=20000",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=300)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB) from {url}")


async def run_once():
    """Start the deployment through the API; wait until the serve process has finished it."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.deployments import arun_deployment

    run = await arun_deployment(DEPLOYMENT, timeout=0)
    async with get_client() as client:
        while not (run := await client.read_flow_run(run.id)).state.is_final():
            await asyncio.sleep(2)
        deployment = await client.read_deployment_by_name(DEPLOYMENT)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["video-build-funnel"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    if not run.state.is_completed():
        raise SystemExit(f"the build ended {run.state.name}: {run.state.message}")
    return deployment, run, artifacts[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=4200)
    args = p.parse_args()
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", args.port)) == 0:
            raise SystemExit(f"port {args.port} is taken: pass --port")

    from gr2.flows.demo import DEMO_DATA

    home = Path(tempfile.mkdtemp(prefix="gr2-prefect-shot-"))
    api = f"http://127.0.0.1:{args.port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2", "GR2_PROGRESS": "0"}
    os.environ.update(env)  # this process talks to the same server
    prefect = Path(sys.executable).with_name("prefect")
    log = open(home / "processes.log", "w")
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(args.port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    served, ok = None, False
    try:
        wait_for("the Prefect server", lambda: urllib.request.urlopen(f"{api}/health", timeout=5).status == 200)
        # The two commands a team runs: `prefect server start`, then this.
        served = subprocess.Popen([sys.executable, "-m", "gr2.flows", "serve", "--lake", str(home / "lake"),
                                   str(DEMO_DATA / "sthv2" / "manifest.jsonl"), "--cron", "0 3 * * *",
                                   "--name", "nightly", "--no-embed", "--no-caption"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for("the deployment", lambda: b"nightly" in urllib.request.urlopen(
            urllib.request.Request(f"{api}/deployments/filter", data=b"{}", method="POST",
                                   headers={"Content-Type": "application/json"}), timeout=5).read())
        deployment, run, artifact = asyncio.run(run_once())
        ui = f"http://127.0.0.1:{args.port}"
        screenshot(f"{ui}/deployments/deployment/{deployment.id}", DOCS / "prefect-nightly-build.png", home / "chrome")
        screenshot(f"{ui}/artifacts/artifact/{artifact.id}", DOCS / "prefect-build-funnel.png", home / "chrome")
        ok = True
    finally:
        for proc in (served, server):
            if proc is not None:
                stop(proc)
        log.close()
        if ok:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"the server's and gr2 serve's output: {home / 'processes.log'}", file=sys.stderr)


if __name__ == "__main__":
    main()
