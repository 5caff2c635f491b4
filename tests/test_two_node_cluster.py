"""A 2-node Ray cluster (two raylets from `ray start` on this machine) runs a build, a robot ingest and
a short training through RAY_ADDRESS, with sources and lake on moto's S3 server: no path is shared
through local disk, so whatever a worker on the other node reads or writes goes through the store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow.compute as pc
import pytest
from test_s3_robot_training import SAMPLES, local_ids, upload

from gr2.lake.lake import Lake


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head and a worker raylet of 1 CPU each on loopback; yields the address to join."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = 26379 + os.getpid() % 1000
    # The raylets' workers take moto's keys and endpoint from the environment they start in (gr2
    # never ships keys to Ray); token auth off, as on a developer's machine. No drain on SIGTERM:
    # Ray waits up to 30 s for a node to drain first (for Serve on Kubernetes), here for nothing.
    env = {**os.environ, **s3_server, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    # --block keeps each node's processes in its own session, so teardown stops exactly this cluster.
    nodes = [subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--block",
                               "--include-dashboard=false", "--disable-usage-stats"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        # A worker raylet needs only the head's GCS: its port open is enough, and a socket costs
        # nothing where a probe that imports Ray and joins takes seconds on this loaded machine.
        wait_for_port(port, nodes[0])
        nodes.append(subprocess.Popen([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--block"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        wait_for_nodes(port, 2, nodes)
        yield f"127.0.0.1:{port}"
    finally:
        for proc in reversed(nodes):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(nodes):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_for_port(port: int, head: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and head.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"ray head on port {port} " + (f"exited with {head.returncode}" if head.poll() is not None
                                              else f"did not listen within {timeout:.0f} s"))


def wait_for_nodes(port: int, n: int, nodes: list[subprocess.Popen], timeout: float = 300) -> None:
    # Each probe is a Python process that imports Ray and joins the cluster: tens of seconds on a
    # loaded 2-core machine (a full suite beside a benchmark once needed more than 120 s for two).
    code = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    r = None
    while time.time() < deadline:
        dead = [" ".join(p.args[1:3]) for p in nodes if p.poll() is not None]
        if dead:  # a raylet that exited never joins: say so now, not after the timeout
            pytest.fail(f"`{dead[0]}` exited before the cluster reached {n} nodes")
        r = subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{port}"], capture_output=True, text=True,
                           env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    last = f"; last probe: exit {r.returncode}, {r.stdout.strip()[-200:]!r} {r.stderr.strip()[-500:]!r}" if r else ""
    pytest.fail(f"ray cluster on port {port} never reached {n} nodes in {timeout:.0f} s{last}")


def gr2(cluster: str, prefect_server: str, *args: str) -> str:
    """`python -m gr2.flows ARGS` joined to the cluster; returns its output, failing the test on a non-zero exit."""
    env = {**os.environ, "GR2_PROGRESS": "0", "RAY_ADDRESS": cluster, "RAY_AUTH_MODE": "disabled",
           "PREFECT_API_URL": prefect_server}
    p = subprocess.run([sys.executable, "-m", "gr2.flows", *args], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900)
    assert p.returncode == 0, p.stdout
    return p.stdout


def test_a_build_of_videos_on_s3_into_an_s3_lake(cluster, prefect_server, s3_bucket, media, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for key in ("cut", "webm", "avi"):
        os.link(media[key], folder / media[key].name)
    videos_uri = upload(folder, s3_bucket, "videos")
    lake_uri = f"s3://{s3_bucket}/lake"
    gr2(cluster, prefect_server, "build-videos", "--lake", lake_uri, "--no-embed", "--no-caption", videos_uri)

    lake = Lake(lake_uri)
    videos, clips = lake.read("videos"), lake.read("clips")
    assert sorted(videos["uri"].to_pylist()) == sorted(f"{videos_uri}/{media[k].name}" for k in ("cut", "webm", "avi"))
    assert set(videos["status"].to_pylist()) == {"accepted"}
    ids = clips["clip_id"].to_pylist()
    assert len(ids) >= 3 and len(ids) == len(set(ids))
    assert set(clips["video_id"].to_pylist()) == set(videos["video_id"].to_pylist())


def test_robot_sources_on_s3_ingest_into_an_s3_lake_once_and_a_rerun_adds_nothing(
        cluster, prefect_server, s3_bucket, recorded):
    metaworld = upload(recorded, s3_bucket, "robot/metaworld")
    rt1 = upload(SAMPLES / "rt1", s3_bucket, "robot/rt1")
    missing = f"s3://{s3_bucket}/robot/nothing-here"
    lake_uri = f"s3://{s3_bucket}/lake"
    argv = ["ingest-robot", "--lake", lake_uri, metaworld, rt1, missing, "--workers", "2"]
    gr2(cluster, prefect_server, *argv)

    lake = Lake(lake_uri)
    episodes = lake.read("episodes")
    status = dict(zip(episodes["source"].to_pylist(), episodes["status"].to_pylist()))
    accepted = episodes.filter(pc.equal(episodes["status"], "accepted"))
    assert sorted(accepted["source"].to_pylist()) == [metaworld, metaworld, rt1]
    assert set(accepted.filter(pc.equal(accepted["source"], metaworld))["episode_id"].to_pylist()) == local_ids(recorded)
    assert status[missing] == "failed"
    reason = episodes.filter(pc.equal(episodes["source"], missing))["reason"][0].as_py()
    assert f"{missing}: cannot list episodes" in reason and "no such object or prefix" in reason

    steps = lake.read("steps", columns=["step_id", "episode_id", "views"])
    lengths = dict(zip(accepted["episode_id"].to_pylist(), accepted["length"].to_pylist()))
    assert len(steps) == sum(lengths.values()) and len(set(steps["step_id"].to_pylist())) == len(steps)
    assert set(steps["episode_id"].to_pylist()) == set(lengths)
    corner = [v for vs in steps["views"].to_pylist() for v in vs if v["camera"] == "corner" and v["ok"]]
    assert corner and corner[0]["jpeg"][:2] == b"\xff\xd8"
    assert lake.latest_build("ingest-robot")["funnel"]["accepted"] == 3

    versions = {t: lake.dataset(t).version for t in ("episodes", "steps")}
    gr2(cluster, prefect_server, *argv)
    funnel = lake.latest_build("ingest-robot")["funnel"]
    assert (funnel["accepted"], funnel["already_in_lake"], funnel["steps_added"]) == (3, 3, 0)
    assert len(lake.read("episodes")) == len(episodes) and len(lake.read("steps", columns=["step_id"])) == len(steps)
    assert lake.dataset("steps").version == versions["steps"]  # nothing to add: no new version


def test_a_short_fine_tune_on_both_nodes_reads_an_s3_lake_and_checkpoints_to_it(
        cluster, prefect_server, s3_bucket, tmp_path):
    from test_training_lakes import robot_lake, save_tokenizer
    from test_training_loop import SMALL

    from gr2.lake.uri import url_to_fs
    from gr2.training import checkpoint as ckpt
    from gr2.training.metrics import read_metrics

    root = f"s3://{s3_bucket}/lake"
    # The tokenizer lives in the lake on S3 only: this machine's copy is deleted before training, so a
    # worker that read it from local disk would fail.
    local_tokenizer, tokenizer_id = save_tokenizer(str(tmp_path))
    # the project's own filesystem call: it names the endpoint, where a bare fsspec.filesystem("s3") is
    # reused from an earlier test of this process that pointed AWS_ENDPOINT_URL elsewhere (port 9, refused)
    fs, path = url_to_fs(f"{root}/models/tokenizers/{tokenizer_id}")
    fs.put(local_tokenizer, path, recursive=True)
    shutil.rmtree(tmp_path / "models")
    robot_lake(root, episodes=4, length=10, tokenizer_id=tokenizer_id)
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model": SMALL, "data": {"shuffle_buffer": 8}, "checkpoint_every": 2,
                                  "report_every": 2, "warmup_steps": 1}))
    # Two workers of 1 CPU on two 1-CPU nodes: Ray Train must seat one on each, so DDP runs across nodes.
    out = gr2(cluster, prefect_server, "train", "--lake", root, "--stage", "finetune", "--workers", "2",
              "--steps", "2", "--batch-size", "4", "--config", str(config), "--json")

    result = json.loads(out[out.index("{"):])
    assert result["steps"] == 2 and result["workers"] == 2
    assert result["checkpoint"] == f"{root}/models/gr2/{result['run_id']}/step-000002"
    assert [r["step"] for r in read_metrics(result["run_dir"])] == [1, 2]
    meta = ckpt.read_meta(result["checkpoint"])
    assert meta["lake"] == root and meta["tokenizer_path"] == f"{root}/models/tokenizers/{tokenizer_id}"
    assert meta["table_version"] == Lake(root).dataset("steps").version
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1")  # the loopback server, never a real store

