"""Does the lake hold? Concurrent writers and builds, injected faults and hostile inputs, on a local
path and on S3 (moto's server on 127.0.0.1).

    .venv/bin/python checks/reliability.py [--repeat N] [--only SECTION,...]

Sections: lance, commit, builds, faults, hostile. Prints a table and writes
checks/results/reliability.json. Every check here is a count of rows and ids, never a time: a
fault suite run at a larger scale and more repeats than the test suite can afford, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

OUT = Path(__file__).parent / "results" / "reliability.json"  # checks/results/
SECTIONS = ("lance", "commit", "builds", "faults", "hostile")
# The lake's guarantees are under test, not the models: no CLIP/CoCa stages (BuildConfig's default
# random-init ViT-B-32s cost minutes per build on this machine's 2 shared cores).
FAST = {"frame_size": 64, "frames_per_clip": 4, "clip_model": None, "caption_model": None}
FAST_YAML = "frame_size: 64\nframes_per_clip: 4\nclip_model: null\ncaption_model: null\n"


# -- fixtures: media, an S3 server, buckets -------------------------------------------------------


def ffmpeg(out: Path, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args, str(out)], check=True)
    return out


def make_media(d: Path) -> dict[str, Path]:
    """Small videos from ffmpeg's test sources (each different content), and broken files."""
    lavfi = lambda src: ["-f", "lavfi", "-i", src]  # noqa: E731
    h264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast"]
    m = {
        "cut": ffmpeg(d / "cut.mp4", *lavfi("testsrc2=size=192x128:rate=25:duration=2"),
                      *lavfi("mandelbrot=size=192x128:rate=25"), "-filter_complex",
                      "[1:v]trim=duration=2,setpts=PTS-STARTPTS[b];[0:v][b]concat=n=2:v=1[v]", "-map", "[v]",
                      *h264, "-g", "25"),
        "webm": ffmpeg(d / "vp9.webm", *lavfi("testsrc2=size=160x120:rate=15:duration=3"),
                       "-c:v", "libvpx-vp9", "-b:v", "200k", "-deadline", "realtime", "-cpu-used", "8"),
        "avi": ffmpeg(d / "mpeg4.avi", *lavfi("testsrc=size=176x144:rate=20:duration=3"), "-c:v", "mpeg4", "-q:v", "5"),
        "bars": ffmpeg(d / "bars.mp4", *lavfi("smptehdbars=size=160x120:rate=25:duration=2"),
                       "-vf", "noise=alls=40:allf=t", *h264),
        # Several 1 s clips each, so a driver can be killed between commits.
        "long1": ffmpeg(d / "long1.mp4", *lavfi("testsrc2=size=160x120:rate=25:duration=4"), *h264),
        "long2": ffmpeg(d / "long2.mp4", *lavfi("mandelbrot=size=160x120:rate=25"), "-t", "4", *h264),
        "tiny": ffmpeg(d / "tiny.mp4", *lavfi("testsrc2=size=64x48:rate=10:duration=2"), *h264),
        "audio": ffmpeg(d / "audio_only.mp4", *lavfi("sine=frequency=440:duration=2"), "-c:a", "aac"),
        "caption_video": ffmpeg(d / "captioned.mp4", *lavfi("testsrc=size=160x120:rate=25:duration=2"), *h264),
        "dup_video": ffmpeg(d / "dup.mp4", *lavfi("rgbtestsrc=size=160x120:rate=25:duration=2"),
                            "-vf", "noise=alls=30:allf=t", *h264),
    }
    m["empty"] = d / "empty.mp4"
    m["empty"].write_bytes(b"")
    m["text"] = d / "notes.mp4"
    m["text"].write_text("these are meeting notes, not a video\n" * 20)
    whole = ffmpeg(d / "whole.mp4", *lavfi("testsrc2=size=160x120:rate=25:duration=3"), *h264)
    m["truncated"] = d / "truncated.mp4"
    m["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    whole.unlink()
    return m


def start_s3() -> tuple[object, dict]:
    """moto's S3 server on 127.0.0.1 (a real S3 API, no network); sets and returns the AWS env."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    os.environ.update(env)
    return server, env


def new_bucket(tag: str) -> str:
    """A fresh bucket. Names are unique per run: gr2 caches S3 sources on disk by uri."""
    import boto3

    name = f"gr2-rel-{tag}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


def upload(bucket: str, paths: list[Path], prefix: str = "videos") -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for p in paths:
        s3.upload_file(str(p), bucket, f"{prefix}/{p.name}")
    return [f"s3://{bucket}/{prefix}/{p.name}" for p in paths]


def race(fns) -> list[Exception]:
    """Run `fns` in threads released together; returns the exceptions they raised."""
    barrier = threading.Barrier(len(fns))
    errors: list[Exception] = []

    def run(fn):
        barrier.wait()
        try:
            fn()
        except Exception as e:  # reported in the row
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return errors


def guarded(section: str, case: str, where: str, fn, *args) -> list[dict]:
    """`fn(*args)` (a row or rows); an exception it raises becomes a BROKEN row instead of ending the run."""
    t0 = time.time()
    try:
        out = fn(*args)
        out = out if isinstance(out, list) else [out]
    except Exception as e:  # the report must say which case broke and how
        import traceback

        out = [row(section, case, where, f"raised {type(e).__name__}: {' '.join(str(e).split())[:300]}", "BROKEN",
                   time.time() - t0, traceback=traceback.format_exc()[-3000:])]
    for r in out:
        print(f"[{r['section']}] {r['case']} ({r['where']}): {r['verdict']}, {r['seconds']:.0f} s",
              file=sys.stderr, flush=True)
    return out


def row(section: str, case: str, where: str, outcome: str, verdict: str, seconds: float, **details) -> dict:
    return {"section": section, "case": case, "where": where, "outcome": outcome, "verdict": verdict,
            "seconds": round(seconds, 1), "details": details}


# -- 1. Lance on its own --------------------------------------------------------------------------


def _ids(lo: int, hi: int):
    import pyarrow as pa

    return pa.table({"id": [f"id-{i}" for i in range(lo, hi)], "x": list(range(lo, hi))})


def lance_merge_race(uri: str) -> tuple[int, list]:
    """Two threads, bare merge_insert of the same 50 new ids; (rows those ids end with, errors)."""
    import lance

    from gr2.lake.uri import storage_options

    opts = storage_options(uri)
    lance.write_dataset(_ids(0, 10), uri, storage_options=opts)

    def merge():
        ds = lance.dataset(uri, storage_options=opts)
        ds.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(_ids(100, 150))

    errors = race([merge, merge])
    return lance.dataset(uri, storage_options=opts).count_rows("x >= 100"), errors


def section_lance(tmp: Path, repeat: int) -> list[dict]:
    import lance

    rows = []
    for where in ("local", "s3"):
        t0 = time.time()
        counts, errors = [], []
        bucket = new_bucket("lance") if where == "s3" else None
        for i in range(repeat):
            uri = str(tmp / f"race{i}.lance") if where == "local" else f"s3://{bucket}/race{i}.lance"
            n, errs = lance_merge_race(uri)
            counts.append(n)
            errors += [f"{type(e).__name__}: {e}" for e in errs]
        doubled = sum(n > 50 for n in counts)
        outcome = f"50 new ids -> rows {sorted(set(counts))}; doubled in {doubled}/{repeat} runs"
        outcome += "" if doubled else " (DESIGN.md says it doubles: out of date?)"
        outcome += f"; {len(errors)} writer errors" if errors else ""
        verdict = "doubles" if doubled == repeat else "no doubles" if doubled == 0 else "sometimes"
        rows.append(row("Lance", "2 threads, bare merge_insert, same 50 new ids", where, outcome, verdict,
                        time.time() - t0, rows_per_run=counts, errors=errors, pylance=lance.__version__))
    return rows


# -- 2. The lake's committer ----------------------------------------------------------------------


def section_commit(tmp: Path, repeat: int) -> list[dict]:
    from gr2.lake.lake import Lake

    rows = []
    batch = [{"build_id": f"b{i}", "flow": "bench"} for i in range(50)]
    for where in ("local", "s3"):
        t0 = time.time()
        results, errors = [], []
        bucket = new_bucket("commit") if where == "s3" else None
        for i in range(repeat):
            root = str(tmp / f"commit{i}") if where == "local" else f"s3://{bucket}/lake{i}"
            Lake(root).commit("builds", [{"build_id": "seed"}])
            errs = race([lambda: Lake(root).commit("builds", batch) for _ in range(4)])
            errors += [f"{type(e).__name__}: {e}" for e in errs]
            ids = Lake(root).read("builds", columns=["build_id"])["build_id"].to_pylist()
            results.append((len(ids), len(set(ids))))
        held = all(n == u == 51 for n, u in results) and not errors
        outcome = f"50 ids (+1 seed) -> rows/unique {sorted(set(results))} over {repeat} runs"
        rows.append(row("Lake.commit", "4 concurrent writers, same 50 ids", where, outcome,
                        "held" if held else "BROKEN", time.time() - t0, rows_unique_per_run=results, errors=errors))
    return rows


# -- 3. Concurrent builds (separate processes) ----------------------------------------------------


def cli(args: list[str], env: dict) -> subprocess.Popen:
    """`python -m gr2.flows ARGS` in a session of its own (so whatever it starts can be found)."""
    return subprocess.Popen([sys.executable, "-m", "gr2.flows", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout_s: float = 300.0) -> tuple[str, int | None]:
    """(output, exit code) of a CLI run; a run past `timeout_s` is killed with its session (code None)."""
    try:
        return proc.communicate(timeout=timeout_s)[0], proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        reap_session(proc.pid, grace_s=0)
        return out + f"\n[killed by the benchmark after {timeout_s:.0f} s]", None


def session_members(sid: int) -> list[int]:
    """Live processes in session `sid` (read from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d))
    return out


def reap_session(sid: int, grace_s: float = 5.0) -> list[str]:
    """Kill (by pid) processes still in session `sid` after `grace_s`; returns what they were."""
    deadline = time.time() + grace_s
    while session_members(sid) and time.time() < deadline:
        time.sleep(0.5)
    left = []
    for pid in session_members(sid):
        try:
            left.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80].strip())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    return left


def lake_checks(lake, n_inputs: int) -> dict:
    """Rows, unique ids and accounting of a video lake."""
    videos = lake.read("videos", columns=["video_id", "uri", "status", "clip_count"])
    clips = lake.read("clips", columns=["clip_id", "video_id"])
    vids, cids = videos["video_id"].to_pylist(), clips["clip_id"].to_pylist()
    return {
        "inputs": n_inputs, "videos": len(vids), "unique_video_ids": len(set(vids)),
        "clips": len(cids), "unique_clip_ids": len(set(cids)),
        "clip_count_sum": sum(c or 0 for c in videos["clip_count"].to_pylist()),
        "status": {s: videos["status"].to_pylist().count(s) for s in sorted(set(videos["status"].to_pylist()))},
        "orphan_clips": len(set(clips["video_id"].to_pylist()) - set(vids)),
    }


def lake_holds(c: dict) -> bool:
    return (c["videos"] == c["unique_video_ids"] == c["inputs"] and c["clips"] == c["unique_clip_ids"]
            == c["clip_count_sum"] and c["orphan_clips"] == 0)


def section_builds(media: dict, tmp: Path, prefect_url: str) -> list[dict]:
    from gr2.lake.lake import Lake

    rows = []
    a_files = [media["cut"], media["webm"], media["avi"], media["empty"]]
    b_files = [media["webm"], media["avi"], media["bars"], media["text"]]
    cfg = tmp / "builds.yaml"
    cfg.write_text(FAST_YAML + "workers: 1\n")
    for where in ("local", "s3"):
        t0 = time.time()
        if where == "local":
            lake_uri = str(tmp / "concurrent-lake")
            a, b = [str(p) for p in a_files], [str(p) for p in b_files]
        else:
            bucket = new_bucket("builds")
            uris = dict(zip(a_files + b_files, upload(bucket, a_files + b_files)))
            a, b = [uris[p] for p in a_files], [uris[p] for p in b_files]
            lake_uri = f"s3://{bucket}/lake"
        procs = [cli(["build-videos", "--lake", lake_uri, "--config", str(cfg), *srcs],
                     {"PREFECT_API_URL": prefect_url, "GR2_PROGRESS": "0"}) for srcs in (a, b)]
        outs, codes = (list(x) for x in zip(*[finish(p) for p in procs]))
        left = [name for p in procs for name in reap_session(p.pid)]
        lake = Lake(lake_uri)
        c = lake_checks(lake, len(set(a) | set(b)))
        builds = lake.read("builds").to_pylist()
        per_build = []
        for bld in builds:
            f = json.loads(bld["funnel_json"] or "{}")
            tagged = {t: len(lake.read(t, columns=[schema_key(t)], version=bld["build_id"]))
                      for t in ("videos", "clips")}
            per_build.append({"build_id": bld["build_id"], "inputs": f.get("inputs"), "accepted": f.get("accepted"),
                              "rejected": f.get("rejected"), "failed": f.get("failed"), "processed": f.get("processed"),
                              "skipped_already_in_lake": f.get("skipped_already_in_lake"), "rows_at_tag": tagged})
        accounted = len(per_build) == 2 and all(
            b_["inputs"] == 4 == (b_["accepted"] or 0) + (b_["rejected"] or 0) + (b_["failed"] or 0) for b_ in per_build)
        tags_ok = len(per_build) == 2 and all(b_["rows_at_tag"]["videos"] >= 4 for b_ in per_build)
        held = codes == [0, 0] and lake_holds(c) and accounted and tags_ok
        work = "+".join(str(b_["processed"]) for b_ in per_build)
        outcome = (f"exit {codes}; processed {work}; videos {c['videos']} rows/{c['unique_video_ids']} ids "
                   f"for {c['inputs']} distinct inputs; clips {c['clips']}/{c['unique_clip_ids']}; "
                   f"per build a+r+f==4: {accounted}; tags readable: {tags_ok}")
        rows.append(row("Concurrent builds", "2 x `gr2 build-videos`, 4 inputs each, 2 shared", where, outcome,
                        "held" if held else "BROKEN", time.time() - t0, **c, builds=per_build, exit_codes=codes,
                        leftover_processes=left, output_tails=[o[-1500:] for o in outs] if not held else []))
    return rows


def schema_key(table: str) -> str:
    from gr2.lake import schema

    return schema.TABLE_IDS[table]


# -- 4. Faults ------------------------------------------------------------------------------------


def kill_worker_once(marker: str):
    """An extra build stage that SIGKILLs its own Ray worker the first time it runs.

    Built in a closure so Ray ships it by value (workers cannot import this script).
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


def stale_lease(lake_uri: str) -> dict | None:
    """The lease object a dead committer left on an S3 lake (holder, seconds until it expires), if any."""
    import boto3
    from botocore.exceptions import ClientError

    from gr2.lake.lease import _split

    bucket, key = _split(lake_uri)
    try:
        body = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError:
        return None
    held = json.loads(body.read())
    return {"owner": held.get("owner"), "expires_in_s": round(held.get("expires_at", 0) - time.time(), 1),
            "bucket": bucket, "key": key}


def fault_driver_kill(media: dict, tmp: Path, prefect_url: str, where: str) -> dict:
    """SIGKILL `gr2 build-videos` after its second clip commit, then run it again."""
    from gr2.lake.lake import Lake

    t0 = time.time()
    files = [media["long1"], media["long2"], media["cut"], media["webm"]]
    if where == "local":
        srcs, lake_uri = [str(p) for p in files], str(tmp / "killed-driver-lake")
    else:
        bucket = new_bucket("driver")
        srcs, lake_uri = upload(bucket, files), f"s3://{bucket}/lake"
    cfg = tmp / f"driver-{where}.yaml"
    cfg.write_text(FAST_YAML + "commit_every: 1\nworkers: 1\nclip_s: 1.0\n")
    args = ["build-videos", "--lake", lake_uri, "--config", str(cfg), *srcs]
    env = {"PREFECT_API_URL": prefect_url, "GR2_PROGRESS": "0"}
    lake = Lake(lake_uri)
    proc = cli(args, env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if lake.exists("clips") and lake.dataset("clips").version >= 3:
            break
        time.sleep(0.1)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    t_kill = time.time()
    at_kill = {"videos": len(lake.read("videos")), "clips": len(lake.read("clips"))}
    lease = stale_lease(lake_uri) if where == "s3" else None
    # A driver killed inside a commit leaves the lake's lease behind; the re-run waits until it
    # expires (the lease's TTL, see pipelines/lease.py), and that wait is part of what is measured.
    note = f"; left its lease ({lease['expires_in_s']:.0f} s to expiry)" if lease else ""
    t_rerun = time.time()
    rerun = cli(args, env)
    out, code = finish(rerun)
    rerun_s = time.time() - t_rerun
    reap_session(rerun.pid)
    # Whatever of the killed driver's session is still alive now, a whole re-run later, was orphaned.
    leftovers = reap_session(proc.pid, grace_s=0)
    orphan_age_s = time.time() - t_kill
    c = lake_checks(lake, len(srcs))
    f = lake.latest_build()["funnel"] if code == 0 else {}
    held = killed and code == 0 and lake_holds(c)
    outcome = (f"killed at {at_kill['clips']} clips/{at_kill['videos']} videos{note}; re-run exit {code} "
               f"in {rerun_s:.0f} s, processed {f.get('processed')}, skipped {f.get('skipped_already_in_lake')}; "
               f"final videos {c['videos']}/{c['inputs']}, clips {c['clips']}/{c['unique_clip_ids']} ids"
               f"{f'; Ray agents still alive {orphan_age_s:.0f} s after the kill: ' + ', '.join(leftovers) if leftovers else ''}"
               f"{'' if killed else ' (finished before the kill: not injected)'}")
    return row("Faults", "driver SIGKILLed mid-build, then re-run", where, outcome, "survived" if held else "BROKEN",
               time.time() - t0, injected=killed, at_kill=at_kill, stale_lease=lease, rerun_s=round(rerun_s, 1),
               orphaned_processes=leftovers, orphans_checked_s_after_kill=round(orphan_age_s, 1), rerun_funnel=f,
               **c, output_tail=out[-1500:] if not held else "")


def fault_s3_source_replaced(media: dict, tmp: Path) -> dict:
    """An S3 source object overwritten with other bytes between two builds: is the new content built?"""
    import boto3

    from gr2.lake.lake import Lake
    from gr2.video.build import run_build
    from gr2.video.config import BuildConfig
    from gr2.video.probe import file_id

    t0 = time.time()
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = new_bucket("replaced")
    uri = f"s3://{bucket}/videos/clip.mp4"
    lake = Lake(f"s3://{bucket}/lake")
    s3.upload_file(str(media["cut"]), bucket, "videos/clip.mp4")
    run_build([uri], lake, BuildConfig(**FAST), log=lambda *_: None)
    s3.upload_file(str(media["bars"]), bucket, "videos/clip.mp4")
    second = run_build([uri], lake, BuildConfig(**FAST), log=lambda *_: None)
    ids = set(lake.read("videos", columns=["video_id"])["video_id"].to_pylist())
    new_id = file_id(str(media["bars"]))[0]
    seen = new_id in ids
    outcome = (f"second build: processed {second.funnel['processed']}, skipped {second.funnel['skipped_already_in_lake']}; "
               f"new bytes' id in videos: {seen}" + ("" if seen else
               " (probe.local_copy caches S3 objects by uri, so the old bytes were hashed again)"))
    return row("Faults", "S3 source object overwritten between builds", "s3", outcome,
               "survived" if seen else "BROKEN", time.time() - t0, video_ids=sorted(ids), new_bytes_id=new_id)


def fault_worker_kill(media: dict, tmp: Path) -> dict:
    from gr2.lake.lake import Lake
    from gr2.video.build import Stage, run_build
    from gr2.video.config import BuildConfig

    t0 = time.time()
    marker = str(tmp / "worker-killed")
    lake = Lake(str(tmp / "worker-kill-lake"))
    sources = [str(media["cut"]), str(media["webm"]), str(media["avi"])]
    res = run_build(sources, lake, BuildConfig(**FAST), extra_stages=(Stage(kill_worker_once(marker), batch_size=2),),
                    log=lambda *_: None)
    c = lake_checks(lake, len(sources))
    injected = os.path.exists(marker)
    held = injected and lake_holds(c) and c["status"] == {"accepted": 3} and res.funnel["clips"] == c["clips"]
    outcome = (f"worker pid {Path(marker).read_text() if injected else '-'} killed; videos {c['videos']}/3 accepted "
               f"{c['status'].get('accepted', 0)}; clips {c['clips']} rows/{c['unique_clip_ids']} ids "
               f"(funnel {res.funnel['clips']})")
    return row("Faults", "Ray worker SIGKILLed mid-build (task retried)", "local", outcome,
               "survived" if held else "BROKEN", time.time() - t0, injected=injected, **c)


def fault_vanishing(media: dict, tmp: Path) -> dict:
    from gr2.lake.lake import Lake
    from gr2.video.build import run_build
    from gr2.video.config import BuildConfig

    t0 = time.time()
    gone = tmp / "gone.webm"
    shutil.copy(media["webm"], gone)
    gone.unlink()  # named by its user, gone by the time the build reads it
    lake = Lake(str(tmp / "vanish-lake"))
    res = run_build([str(gone), str(media["avi"])], lake, BuildConfig(**FAST), log=lambda *_: None)
    failed = lake.read("videos", filter="status = 'failed'").to_pylist()
    reason = failed[0]["reason"] if failed else None
    held = (res.funnel["failed"], res.funnel["accepted"]) == (1, 1) and reason and "gone.webm" in reason
    return row("Faults", "source file gone before the build reads it", "local", f"failed row: {reason!r}",
               "survived" if held else "BROKEN", time.time() - t0, funnel={k: res.funnel[k] for k in
                                                                         ("inputs", "accepted", "rejected", "failed")})


class _LeaseFailureSeen(logging.Handler):
    """Sets `event` when Prefect logs a flow attempt that failed because the lake stayed leased."""

    def __init__(self, event: threading.Event):
        super().__init__(logging.ERROR)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + (repr(record.exc_info[1]) if record.exc_info else "")
        if "stayed leased" in text:
            self.event.set()


def fault_lease_held(media: dict, tmp: Path) -> dict:
    """Another committer holds the lake until the build's first attempt gives up waiting (1 s);
    Prefect retries the flow, and the retry must finish with nothing lost or doubled."""
    from prefect.client.orchestration import get_client

    from gr2.flows.build import build_video_dataset
    from gr2.lake.lake import Lake
    from gr2.video.config import BuildConfig

    t0 = time.time()
    lake = Lake(str(tmp / "leased-lake"))
    lake.commit("builds", [{"build_id": "seed"}])
    held, first_failure = threading.Event(), threading.Event()
    hold_s: list[float] = []

    def hold_the_lake():
        with lake.lease():
            held.set()
            start = time.time()
            first_failure.wait(timeout=180)  # however long the build takes to reach its first commit
            hold_s.append(time.time() - start)

    handler = _LeaseFailureSeen(first_failure)
    logging.getLogger("prefect").addHandler(handler)
    logging.getLogger("prefect.flow_runs").addHandler(handler)
    holder = threading.Thread(target=hold_the_lake)
    holder.start()
    held.wait()
    try:
        flaky = build_video_dataset.with_options(retries=3, retry_delay_seconds=3)
        state = flaky(sources=[str(media["webm"]), str(media["avi"])], lake=lake.root,
                      config=BuildConfig(**FAST, lease_timeout_s=1.0), return_state=True)
    finally:
        first_failure.set()
        holder.join()
        logging.getLogger("prefect").removeHandler(handler)
        logging.getLogger("prefect.flow_runs").removeHandler(handler)
    with get_client(sync_client=True) as client:
        run_count = client.read_flow_run(state.state_details.flow_run_id).run_count
    c = lake_checks(lake, 2)
    ok = state.is_completed() and lake_holds(c) and run_count > 1
    outcome = (f"lease held {hold_s[0]:.0f} s; flow {state.type.value.lower()} after {run_count} runs; "
               f"videos {c['videos']}/2 ({c['unique_video_ids']} ids), clips {c['clips']}/{c['unique_clip_ids']} ids"
               + ("" if run_count > 1 else " (no attempt ever waited on the lease: not injected)"))
    return row("Faults", "lake leased past the build's 1 s wait; flow retries=3",
               "local", outcome, "survived" if ok else "BROKEN", time.time() - t0, run_count=run_count,
               lease_held_s=round(hold_s[0], 1), **c)


# -- 5. Hostile inputs ----------------------------------------------------------------------------


def hostile_cases(media: dict, d: Path) -> list[tuple[str, str]]:
    """(what, source as a user would type it)."""
    (d / "nul.jsonl").write_text(json.dumps({"uri": "clip\x00.mp4", "caption": "x"}) + "\n")
    (d / "no_uri.csv").write_text("path,caption\nx.mp4,a clip\n")
    (d / "latin1.csv").write_bytes(b"uri,caption\n\xff\xfe.mp4,\xc3\x28 broken caf\xe9\n")
    (d / "not_objects.jsonl").write_text('[1, 2]\n"just a string"\n42\n')
    dup = str(media["dup_video"])
    (d / "dups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"uri": dup, "caption": "first"}, {"uri": dup}, {"uri": "./" + os.path.relpath(dup, d)}]))
    (d / "long_caption.csv").write_text(f"uri,caption\n{media['caption_video']},{'a' * 20_000}\n")
    return [
        ("zero-byte .mp4", str(media["empty"])),
        ("text file named .mp4", str(media["text"])),
        ("truncated mp4 (first third)", str(media["truncated"])),
        ("audio-only mp4", str(media["audio"])),
        ("tiny resolution 64x48", str(media["tiny"])),
        ("missing path", str(d / "no-such-video.mp4")),
        ("NUL byte in a manifest uri", str(d / "nul.jsonl")),
        ("manifest with no uri column", str(d / "no_uri.csv")),
        ("non-UTF-8 CSV manifest", str(d / "latin1.csv")),
        ("JSONL with non-object lines", str(d / "not_objects.jsonl")),
        ("manifest naming one file 3 times", str(d / "dups.jsonl")),
        ("20 kB caption in a manifest", str(d / "long_caption.csv")),
    ]


def section_hostile(media: dict, tmp: Path) -> list[dict]:
    from gr2.lake.lake import Lake
    from gr2.video.build import latest_by_uri, run_build
    from gr2.video.config import BuildConfig
    from gr2.video.sources import SourceError, list_inputs

    d = tmp / "hostile"
    d.mkdir()
    cases = hostile_cases(media, d)
    listed: dict[str, list[dict] | str] = {}
    for what, src in cases:
        try:
            listed[what] = list_inputs([src])
        except SourceError as e:
            listed[what] = str(e)
        except Exception as e:  # a traceback a user would see: exactly what this section looks for
            listed[what] = f"UNCAUGHT {type(e).__name__}: {e}"
    t0 = time.time()
    lake = Lake(str(tmp / "hostile-lake"))
    res = run_build([src for what, src in cases if isinstance(listed[what], list)], lake, BuildConfig(**FAST),
                    log=lambda *_: None)
    build_s = time.time() - t0
    by_uri = latest_by_uri(lake)
    captions = {r["uri"]: r["caption"] for r in lake.read("videos", columns=["uri", "caption"]).to_pylist()}
    rows = []
    for what, src in cases:
        got = listed[what]
        if isinstance(got, str):
            one_line = "\n" not in got and not got.startswith("UNCAUGHT")
            rows.append(row("Hostile input", what, "local", f"error: {got}", "clear error" if one_line else "BROKEN",
                            0.0, source=src))
            continue
        ends = []
        for i in got:
            r = by_uri.get(i["uri"])
            if r is None:
                ends.append("LOST (no row)")
                continue
            text = r["status"] + (f": {r['reason']}" if r["reason"] else "")
            if what.startswith("20 kB") and r["uri"] in captions:
                text += f" (caption kept: {len(captions[r['uri']] or '')} chars)"
            ends.append(text)
        prefix = f"{len(got)} input(s) from the source; " if len(got) != 1 or "manifest" in what else ""
        lost = any(e.startswith("LOST") for e in ends)
        rows.append(row("Hostile input", what, "local", prefix + " | ".join(ends), "BROKEN" if lost else "accounted",
                        0.0, source=src, inputs=len(got)))
    f = res.funnel
    rows.append(row("Hostile input", "all of the above in one build", "local",
                    f"{f['inputs']} inputs = {f['accepted']} accepted + {f['rejected']} rejected + {f['failed']} failed; "
                    f"{len(by_uri)} uris in videos",
                    "accounted" if f["inputs"] == f["accepted"] + f["rejected"] + f["failed"] == len(by_uri) else "BROKEN",
                    build_s, funnel={k: f[k] for k in ("inputs", "accepted", "rejected", "failed",
                                                       "rejected_by_reason", "failed_by_reason")}))
    return rows


# -- the report -----------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    section = None
    w_case = max(len(r["case"]) for r in rows)
    print(f"{'case':<{w_case}}  {'where':<5}  {'verdict':<12}  {'s':>6}  outcome")
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            print(f"-- {section} " + "-" * max(0, w_case + 30 - len(section)))
        print(f"{r['case']:<{w_case}}  {r['where']:<5}  {r['verdict']:<12}  {r['seconds']:>6.1f}  {r['outcome']}")


def main() -> None:
    from gr2.flows.runtime import offline_defaults

    offline_defaults()  # no telemetry; MuJoCo through OSMesa
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["GR2_PROGRESS"] = "0"
    os.environ.pop("RAY_ADDRESS", None)  # a fresh local Ray, never a user's cluster
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=5, help="runs of each concurrent-writer race")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="gr2-reliability-"))
    server, _ = start_s3()
    rows: list[dict] = []
    try:
        media = make_media(tmp)
        if "lance" in only:
            rows += guarded("Lance", "bare merge_insert race", "both", section_lance, tmp, args.repeat)
        if "commit" in only:
            rows += guarded("Lake.commit", "4 concurrent writers", "both", section_commit, tmp, args.repeat)
        if {"builds", "faults", "hostile"} & set(only):
            from prefect.settings import PREFECT_API_URL
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=180):
                url = PREFECT_API_URL.value()
                # Subprocess work first, before this process starts a Ray of its own on the same cores.
                if "builds" in only:
                    rows += guarded("Concurrent builds", "2 x gr2 build-videos", "both", section_builds, media, tmp, url)
                if "faults" in only:
                    for where in ("local", "s3"):
                        rows += guarded("Faults", "driver SIGKILLed mid-build, then re-run", where,
                                        fault_driver_kill, media, tmp, url, where)
                if "faults" in only or "hostile" in only:
                    import ray

                    from gr2.flows.runtime import ensure_ray

                    ensure_ray(num_cpus=2)
                    if "faults" in only:
                        rows += guarded("Faults", "Ray worker SIGKILLed mid-build", "local", fault_worker_kill, media, tmp)
                        rows += guarded("Faults", "source file gone before the build reads it", "local", fault_vanishing, media, tmp)
                        rows += guarded("Faults", "lake leased past the timeout, flow retried", "local",
                                        fault_lease_held, media, tmp)
                        rows += guarded("Faults", "S3 source object overwritten between builds", "s3",
                                        fault_s3_source_replaced, media, tmp)
                    if "hostile" in only:
                        rows += guarded("Hostile input", "all hostile inputs", "local", section_hostile, media, tmp)
                    ray.shutdown()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows)
    broken = [r for r in rows if r["verdict"] == "BROKEN"]
    load = os.getloadavg()
    print(f"{len(rows)} rows, {len(broken)} broken, {time.time() - t_start:.0f} s "
          f"(load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on a shared machine; seconds are indicative only)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    import lance
    import ray

    OUT.write_text(json.dumps({"rows": rows, "repeat": args.repeat, "sections": only, "pylance": lance.__version__,
                               "ray": ray.__version__, "load_average_at_end": load,
                               "elapsed_s": round(time.time() - t_start, 1)},
                              indent=2, default=str))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
