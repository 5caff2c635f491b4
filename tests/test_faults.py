"""Storage faults, injected for real: gr2's jobs on an S3 lake behind a proxy that returns 500s and
503 SlowDown, resets connections and stalls replies; a local lake whose disk fills mid-commit."""

from __future__ import annotations

import pytest
from fault_runs import make_videos, robot_ingest, run_job, save_tokenizer, training, upload, video_build, video_tokenize
from faultproxy import FaultProxy

from gr2.lake.lake import Lake

RETRIED = ("500", "503", "reset", "stall")  # what every client retries by its own settings
RATE = 0.05  # per kind: every kind is met a few times by each job, and the whole file stays cheap


@pytest.fixture
def flaky(s3_server, monkeypatch):
    """A FaultProxy in front of moto, every S3 client of this process and of Ray's workers pointed at it."""
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"], seed=17, stall_s=0.5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


def assert_survived(outcome) -> None:
    assert outcome.after_rerun, (outcome.error, outcome.rerun_error, outcome)
    assert outcome.error_one_line, outcome.error
    assert outcome.accounted == outcome.inputs > 0 and outcome.ids_unique, outcome


def test_a_build_a_tokenize_and_a_training_run_on_a_flaky_store_lose_nothing_and_keep_every_id_once(
        ray_local, s3_server, s3_bucket, flaky, tmp_path):
    videos = upload(make_videos(tmp_path / "videos"), s3_bucket, "videos", s3_server["AWS_ENDPOINT_URL"])
    lake = Lake(f"s3://{s3_bucket}/lake")
    tokenizer = save_tokenizer(lake)
    injected = {}
    for job, (run, check) in {"build": video_build(lake, videos, undecodable=1),
                              "tokenize": video_tokenize(lake, tokenizer),
                              "train": training(lake)}.items():
        outcome = run_job(job, flaky, RETRIED, RATE, run, check)
        assert_survived(outcome)
        injected = {k: injected.get(k, 0) + outcome.injected.get(k, 0) for k in RETRIED}
    assert all(injected[k] > 0 for k in RETRIED), injected  # the proxy did make the store flaky, every way


def test_a_robot_ingest_from_and_into_a_flaky_store_accounts_for_every_source_once(
        ray_local, s3_server, s3_bucket, flaky):
    from fault_runs import ROBOT_SAMPLE

    sources = upload([ROBOT_SAMPLE], s3_bucket, "robot", s3_server["AWS_ENDPOINT_URL"])
    sources.append(f"s3://{s3_bucket}/robot/nothing-here")  # a source that fails: a row saying so
    lake = Lake(f"s3://{s3_bucket}/lake")
    outcome = run_job("ingest", flaky, RETRIED, RATE, *robot_ingest(lake, sources, episodes=1))
    assert_survived(outcome)
    assert sum(outcome.injected.values()) > 0, outcome
