"""gr2's jobs run against a flaky object store: a video build, a robot ingest, a tokenize and a short
training run with checkpoints, each on an S3 lake reached through a FaultProxy, each checked for
what must hold whatever the store did: every input has a row, every id is there once.

A job either finishes through the clients' own retries, or stops with an error and finishes when
run again (the same faults still on). Shared by tests/test_faults.py and benchmarks/reliability.py
(which loads this file and faultproxy.py by their paths).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.compute as pc

ROBOT_SAMPLE = Path(__file__).parent / "data" / "robot" / "rt1"  # one annotated-JSON episode, two videos
QUIET = lambda *_, **__: None  # noqa: E731


@dataclass
class Outcome:
    """How one job fared under one fault setting."""

    job: str
    kinds: str  # the fault kinds on, "+"-joined ("none" for a healthy store)
    rate: float  # per kind
    first_try: bool = False  # finished on its first run
    after_rerun: bool = False  # finished by its second run at the latest, the faults still on
    after_heal: bool = False  # finished at the latest on a run once the store was healthy again
    error: str = ""  # the first run's error, when it stopped
    rerun_error: str = ""  # the second run's, when that stopped too
    error_one_line: bool = True
    inputs: int = 0
    accounted: int = 0  # inputs with their row in the lake
    ids_unique: bool = False
    injected: dict = field(default_factory=dict)  # faults the proxy injected during this job, per kind
    requests: int = 0
    seconds: float = 0.0

    def row(self) -> dict:
        return asdict(self)


@dataclass
class Check:
    """What a job left: inputs it was given, how many of them have their row, and whether ids are unique."""

    inputs: int
    accounted: int
    ids_unique: bool
    complete: bool  # everything the job should have done is done (no input failed for the store's sake)


def run_job(job: str, proxy, kinds: tuple[str, ...], rate: float, run: Callable[[bool], None],
            check: Callable[[], Check], heal_after_rerun: bool = False) -> Outcome:
    """`run(rerun)` under `proxy` at `rate` per kind of `kinds`; run again once, the faults still on,
    if it raised or left work undone; with `heal_after_rerun`, a third time on a healthy store. The
    proxy's counts are reset first, so the outcome's are this job's."""
    out = Outcome(job, "+".join(kinds) or "none", rate)
    proxy.reset_counts()
    t0 = time.monotonic()
    for attempt in range(3 if heal_after_rerun else 2):
        proxy.set_rates({k: rate for k in kinds} if attempt < 2 else {})
        error = _attempt(run, check, rerun=attempt > 0)
        if error is None:
            out.first_try, out.after_rerun, out.after_heal = attempt == 0, attempt <= 1, True
            break
        if attempt == 0:
            out.error, out.error_one_line = error, "\n" not in error
        elif attempt == 1:
            out.rerun_error = error
    proxy.set_rates({})
    try:
        final = check()  # read on a healthy store: what the lake holds, whatever the runs did
        out.inputs, out.accounted, out.ids_unique = final.inputs, final.accounted, final.ids_unique
    except Exception as e:
        out.error = out.error or _first_line(e)
    out.injected, out.requests = dict(proxy.injected), proxy.requests
    out.seconds = round(time.monotonic() - t0, 1)
    return out


def _attempt(run: Callable[[bool], None], check: Callable[[], Check], rerun: bool) -> str | None:
    """One run of a job; None when it finished with its work done, else what stopped it."""
    try:
        run(rerun)
        done = check()
    except Exception as e:  # the outcome records it: a job may stop, if it finishes on re-run
        text = str(e).strip()
        return f"{type(e).__name__}: {text}" if "\n" in text else _first_line(e)
    return None if done.complete else "finished with work left undone"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


# -- inputs ---------------------------------------------------------------------------------------


def make_videos(directory: Path) -> list[Path]:
    """Two tiny real videos and a text file named like one: what a build is given."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, src in (("pattern.mp4", "testsrc2=size=160x120:rate=10:duration=2"),
                      ("bars.mp4", "smptebars=size=160x120:rate=10:duration=2")):
        path = directory / name
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src, "-c:v", "libx264",
                        "-pix_fmt", "yuv420p", str(path)], check=True)
        out.append(path)
    notes = directory / "notes.mp4"
    notes.write_text("meeting notes, not a video\n" * 20)
    return [*out, notes]


def upload(paths: list[Path], bucket: str, prefix: str, endpoint: str) -> list[str]:
    """`paths` (files or directories) to s3://bucket/prefix/, straight to the store (no faults)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    uris = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            key = f"{prefix}/{path.name}/{f.relative_to(path).as_posix()}" if path.is_dir() else f"{prefix}/{f.name}"
            s3.upload_file(str(f), bucket, key)
        uris.append(f"s3://{bucket}/{prefix}/{path.name}")
    return uris


def save_tokenizer(lake) -> str:
    """A tiny random-init VQ tokenizer (32x32 frames -> 4x4 tokens) saved in `lake`; its directory."""
    import tempfile

    import torch

    from gr2.lake.uri import url_to_fs
    from gr2.tokenizers import Tokenizer, TokenizerConfig, save_checkpoint

    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(resolution=32, downsample=8, codebook_size=64, channels=8, z_channels=16,
                                    code_dim=8))
    with tempfile.TemporaryDirectory() as staging:
        cid = save_checkpoint(tok, staging, info={"note": "random init, for fault tests"})
        target = f"{lake.models_dir('tokenizer')}/{cid}"
        if lake.is_local:
            shutil.copytree(staging, target, dirs_exist_ok=True)
        else:
            fs, path = url_to_fs(target)
            fs.put(staging + "/", path, recursive=True)
    return target


# -- the jobs -------------------------------------------------------------------------------------

BUILD = dict(frame_size=32, frames_per_clip=4, clip_s=1.0, workers=1, commit_every=8, clip_model=None,
             caption_model=None)


def video_build(lake, videos: list[str], undecodable: int) -> tuple[Callable, Callable]:
    """A build of `videos` (`undecodable` of them are not video) into `lake`."""
    from gr2.video import build
    from gr2.video.config import BuildConfig

    config = BuildConfig(**BUILD)

    def run(rerun: bool) -> None:
        build.run_build(videos, lake, config, retry_failed=rerun, log=QUIET)

    def check() -> Check:
        v = lake.read("videos", columns=["video_id", "uri", "status", "clip_count"])
        clips = lake.read("clips", columns=["clip_id"])
        ids = v["video_id"].to_pylist()
        failed = pc.sum(pc.equal(v["status"], "failed")).as_py() or 0
        unique = len(ids) == len(set(ids)) and len(clips) == len(set(clips["clip_id"].to_pylist())) == \
            sum(c or 0 for c in v["clip_count"].to_pylist())
        accounted = len(set(videos) & set(v["uri"].to_pylist()))
        return Check(len(videos), accounted, unique, accounted == len(videos) and failed == undecodable)

    return run, check


def video_tokenize(lake) -> tuple[Callable, Callable]:
    """A tiny tokenizer saved in `lake` (after its build: the build then left every clip to this job),
    and its tokens for every accepted clip."""
    from gr2.video.tokenize import tokenize_lake

    def run(rerun: bool) -> None:
        tokenize_lake(lake, save_tokenizer(lake), log=QUIET)  # the same seed: a re-run saves the same checkpoint

    def check() -> Check:
        clips = lake.read("clips", columns=["clip_id", "status", "tokenizer_id"])
        accepted = clips.filter(pc.equal(clips["status"], "accepted"))
        tokenized = accepted.filter(pc.is_valid(accepted["tokenizer_id"]))
        ids = clips["clip_id"].to_pylist()
        return Check(len(accepted), len(tokenized), len(ids) == len(set(ids)), len(tokenized) == len(accepted) > 0)

    return run, check


def robot_ingest(lake, sources: list[str], episodes: int) -> tuple[Callable, Callable]:
    """An ingest of `sources` (holding `episodes` episodes, plus one row per source that fails) into `lake`."""
    from gr2.robot.ingest import IngestConfig, ingest

    config = IngestConfig(frame_width=32, frame_height=32, concurrency=1)

    def run(rerun: bool) -> None:
        ingest(sources, lake, config)

    def check() -> Check:
        e = lake.read("episodes", columns=["episode_id", "source", "status", "length"])
        steps = lake.read("steps", columns=["step_id"])
        accepted = e.filter(pc.equal(e["status"], "accepted"))
        ids, step_ids = e["episode_id"].to_pylist(), steps["step_id"].to_pylist()
        unique = len(ids) == len(set(ids)) and len(step_ids) == len(set(step_ids)) == sum(accepted["length"].to_pylist())
        accounted = len(set(sources) & set(e["source"].to_pylist()))
        return Check(len(sources), accounted, unique, accounted == len(sources) and len(accepted) == episodes)

    return run, check


def training(lake, steps: int = 2) -> tuple[Callable, Callable]:
    """A tiny pre-training of `steps` steps on `lake`'s clip tokens, checkpointing every step."""
    from gr2.training.data import DataConfig
    from gr2.training.loop import TrainConfig, train
    from gr2.training.metrics import read_metrics

    config = TrainConfig(stage="pretrain", model={"n_layer": 1, "n_embd": 32, "n_head": 2, "history": 2},
                         data=DataConfig(shuffle_buffer=4, holdout=0.0), steps=steps, batch_size=2,
                         checkpoint_every=1, report_every=1, warmup_steps=1)
    runs: list = []

    def run(rerun: bool) -> None:
        runs.append(train(lake, config))

    def check() -> Check:
        from gr2.training import checkpoint as ckpt

        if not runs:
            return Check(steps, 0, True, False)
        result = runs[-1]
        logged = [r["step"] for r in read_metrics(result.run_dir)]
        ckpt.read_meta(result.checkpoint)  # the last checkpoint is whole enough to read back
        return Check(steps, len(set(logged)), len(logged) == len(set(logged)), result.steps == steps)

    return run, check


def point_at(url: str) -> str | None:
    """Point this process's S3 clients at `url`; returns where they pointed before."""
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url
    return old


def lake_commits(lake, batches: int = 6, rows: int = 20) -> tuple[Callable, Callable]:
    """`batches` commits of `rows` new ids each into `lake`'s builds ledger: Lance alone, no Ray."""
    ledger = [[{"build_id": f"fault-{b}-{i}", "flow": "fault-test"} for i in range(rows)] for b in range(batches)]
    want = {r["build_id"] for batch in ledger for r in batch}

    def run(rerun: bool) -> None:
        for batch in ledger:
            lake.commit("builds", batch)

    def check() -> Check:
        ids = lake.read("builds", columns=["build_id"])["build_id"].to_pylist()
        return Check(len(want), len(want & set(ids)), len(ids) == len(set(ids)), want <= set(ids))

    return run, check
