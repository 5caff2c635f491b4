"""The video build: a Ray Data graph of small stages from inputs to rows in the lake.

    sources --list--> inputs --hash--> (skip what the lake already finished) --survey: probe,
    gates, shots--> clip specs --frames--> gates --> fingerprints --> near-duplicates (weight-free)
    --> thumbnails --> captions --> embeddings --> previews --> near-duplicates (embeddings) -->
    tokens --> driver commits clips, then each video's row once
    all of its clips are in --> tokens for earlier clips, indexes, the builds ledger.

`stages` declares that list, with how Ray runs each stage; `run_build` runs all of it, so a build
from Python and one from `gr2 build-videos` make the same lake.

A video's row is written last, so it marks the video finished: a build killed half-way leaves some
clips and no video row, and the next run redoes that video, merging its clips on their ids.
Workers only produce rows; the driver is the lake's one committer (see lake.py for why).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image

from gr2.lake import gallery, schema
from gr2.lake.index import build_indexes
from gr2.lake.lake import COMPACT_AT_FRAGMENTS, Lake, worker_env
from gr2.lake.query import sql_literal
from gr2.progress import progress
from gr2.video import caption, decode, dedup, fingerprint, gates, probe, shots
from gr2.video.caption import Captioner
from gr2.video.config import BuildConfig
from gr2.video.dedup import Deduplicator, FingerprintDeduplicator
from gr2.video.embed import ClipEmbedder, check_lake_model, resolve_weights
from gr2.video.sources import list_inputs
from gr2.video.tokenize import TokenizeClips, build_tokenizer, tokenize_after_build

FLOW = "build-videos"  # a video build's name in the builds ledger

SHOT_FRAME_SIZE = (64, 36)  # frames for cut detection: small, every one of them decoded


def new_build_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"build-{stamp}-{hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:6]}"


def clip_id(video_id: str, start_frame: int, end_frame: int) -> str:
    return hashlib.sha256(f"{video_id}:{start_frame}:{end_frame}".encode()).hexdigest()[:32]


# -- stages: plain callables over a batch (dict of numpy arrays), testable without Ray ------------


def hash_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add `video_id`, `bytes` and `local_path`; an unreadable input gets `error` instead."""
    ids, sizes, paths, errors = [], [], [], []
    for uri, source_error in zip(batch["uri"], batch["source_error"]):
        vid, size, path, error = probe.uri_id(uri), None, None, _null(source_error)
        if error is None:
            try:
                path = probe.local_copy(uri)
                vid, size = probe.file_id(path)
            except FileNotFoundError:
                error = f"{uri}: file not found"
            except (probe.ProbeError, OSError) as e:
                error = str(e) if isinstance(e, probe.ProbeError) else f"{uri}: cannot read ({e.strerror or e})"
            except ValueError as e:  # e.g. a NUL byte in the path
                error = f"{uri!r}: not a usable path ({e})"
        ids.append(vid), sizes.append(size), paths.append(path), errors.append(error)
    return clean({**batch, "video_id": np.array(ids), "bytes": np.array(sizes, dtype=object),
                  "local_path": np.array(paths, dtype=object), "error": np.array(errors, dtype=object)})


def survey_video(item: dict, config: BuildConfig) -> dict:
    """Probe one video, apply the video gates, find its shots and window them into clip specs."""
    row = {"status": "accepted", "reason": None, "decoder": None, "windows": [], "shot_count": None,
           "frames_decoded": 0}
    if item.get("error"):
        return {**row, "status": "failed", "reason": item["error"]}
    try:
        info = probe.probe(item["local_path"])
    except probe.ContainerRefused as e:
        return {**row, "status": "rejected", "reason": f"container: {str(e).split(': ', 1)[-1]}"}
    except probe.ProbeError as e:
        # A readable file with no video stream is a rejection (it is not video); the rest failed.
        status = "rejected" if "no video stream" in str(e) else "failed"
        reason = f"no_video: {str(e).split(': ', 1)[-1]}" if status == "rejected" else str(e)
        return {**row, "status": status, "reason": reason}
    row.update(info)
    reject = gates.video_gate(info, config)
    if reject:
        return {**row, "status": "rejected", "reason": reject}
    try:
        reader = decode.VideoReader(item["local_path"], *SHOT_FRAME_SIZE)
        frame_count, transitions = shots.find_transitions(reader.chunks(64), info["fps"], config)
    except decode.DecodeError as e:
        return {**row, "status": "failed", "reason": str(e)}
    spans = shots.shot_spans(frame_count, transitions)
    row.update(decoder=reader.decoder, frame_count=frame_count, shot_count=len(spans), frames_decoded=frame_count,
               windows=shots.windows(spans, info["fps"], config.clip_s, config.cut_margin_frames, frame_count))
    return row


def survey_videos(batch: dict[str, np.ndarray], config: BuildConfig) -> dict[str, np.ndarray]:
    """Stage: `survey_video` over every row of the batch."""
    keys = list(batch)
    rows = [survey_video(_plain({k: batch[k][i] for k in keys}), config) for i in range(len(batch["uri"]))]
    out = {k: batch[k] for k in keys}
    for k in ("status", "reason", "decoder", "container", "codec", "duration_s", "fps", "frame_count",
              "width", "height", "rotation", "has_audio", "shot_count", "frames_decoded"):
        out[k] = np.array([r.get(k) for r in rows], dtype=object)
    out["windows"] = np.array([json.dumps(r["windows"]) for r in rows], dtype=object)
    return clean(out)


def read_clip_frames(batch: dict[str, np.ndarray], config: BuildConfig) -> dict[str, np.ndarray]:
    """Stage: decode only each clip's sampled frames, resized on decode, centre-cropped square."""
    batch = clean(batch)
    n, size = config.frames_per_clip, config.frame_size
    frames, sampled, status, reason = [], [], list(batch["status"]), list(batch["reason"])
    for i in range(len(batch["clip_id"])):
        idx = shots.sample_indices(int(batch["start_frame"][i]), int(batch["end_frame"][i]), n)
        idx = (idx + [idx[-1]] * n)[:n]  # a clip shorter than n frames repeats its last one
        w, h = decode.fit_size(int(batch["width"][i]), int(batch["height"][i]), size)
        try:
            got = decode.center_crop(decode.VideoReader(batch["local_path"][i], w, h).get(idx), size)
        except decode.DecodeError as e:
            got = np.zeros((n, size, size, 3), np.uint8)
            status[i], reason[i] = "failed", str(e)
        frames.append(got), sampled.append(np.array(idx, dtype=np.int64))
    return {**batch, "frames": np.stack(frames), "sampled_frames": _objects(sampled),
            "status": np.array(status, dtype=object), "reason": np.array(reason, dtype=object)}


def gate_clips(batch: dict[str, np.ndarray], config: BuildConfig) -> dict[str, np.ndarray]:
    """Stage: score every clip (black, blank, motion) and reject the ones a gate catches."""
    batch = clean(batch)
    scores = [gates.clip_scores(f) for f in batch["frames"]]
    out = gates.reject(batch, [gates.clip_gate(s, float(d), config) for s, d in zip(scores, batch["duration_s"])])
    for k in ("black_score", "blank_score", "motion_score"):
        out[k] = np.array([s[k] for s in scores], dtype=np.float32)
    return out


def fingerprints(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stage: each clip's `fingerprint`, the pHashes of its sampled frames (none for a failed clip)."""
    failed = [str(s) == "failed" for s in batch["status"]]
    return {**batch, "fingerprint": _objects([np.zeros(0, np.uint64) if bad else fingerprint.frame_hashes(f)
                                              for f, bad in zip(batch["frames"], failed)])}


def thumbnails(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stage: a JPEG of each clip's middle sampled frame."""
    out = []
    for f in batch["frames"]:
        buf = io.BytesIO()
        Image.fromarray(f[len(f) // 2]).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return clean({**batch, "thumbnail": np.array(out, dtype=object)})


def _null(v):
    """`v` as plain Python, with NaN (how a null can come back from a numpy batch) as None."""
    if isinstance(v, np.generic):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


def clean(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with Ray's stand-ins for null (an all-NaN float column, NaN in an object column) as None.

    A column that is null in one block and text in another must stay null, not become float, or
    Ray cannot concatenate the blocks.
    """
    out = {}
    for k, v in batch.items():
        if v.dtype.kind == "f" and v.ndim == 1 and len(v) and np.isnan(v).all():
            v = np.array([None] * len(v), dtype=object)
        elif v.dtype == object and v.ndim == 1:
            v = _objects([_null(x) for x in v])
        out[k] = v
    return out


def lake_rows(batch: dict[str, np.ndarray], table: str = "clips") -> pa.Table:
    """Last stage: the batch as rows of `table`'s exact schema (extra working columns dropped)."""
    names = set(schema.SCHEMAS[table].names)
    rows = _rows({k: v for k, v in batch.items() if k in names})
    for row in rows:
        for k in TEXT_COLUMNS:
            if row.get(k) == "":
                row[k] = None
        if row.get("preview") == b"":
            row["preview"] = None
        if row.get("fingerprint") == []:  # a failed clip's: no frames, no fingerprint
            row["fingerprint"] = None
        for k in ("embedding", "caption_embedding"):
            emb = row.get(k)
            if emb is not None and all(x != x for x in emb):  # NaN vector: a failed clip, no caption
                row[k] = None
    return schema.conform(table, rows)


def _plain(row: dict) -> dict:
    return {k: _null(v) for k, v in row.items()}


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    """A numpy batch as plain rows for the lake (arrays as lists, nulls as None)."""
    cols = {k: [_null(v.tolist() if isinstance(v, np.ndarray) else v) for v in vals] for k, vals in batch.items()}
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def _objects(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


# -- the build, declared ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One step of the build: a plain callable over a batch, and how Ray runs it.

    A function runs on a task pool; a class (pool="actor") loads its model once per actor in __init__.
    """

    fn: Callable
    pool: str = "task"  # task | actor
    cpus: float | None = None  # per task or actor; None: Ray's one CPU
    memory_gb: float | None = None  # model actors: what one holds, so Ray starts it only where that fits
    batch_size: int | None = 4  # rows per call; None: a whole block (no concatenating blocks)
    kwargs: dict = field(default_factory=dict)  # the function's keyword arguments, or the class's constructor's
    restart: bool = True  # actors: Ray restarts a dead one (False: its death fails the build)

    def apply(self, ds: ray.data.Dataset, workers: int) -> ray.data.Dataset:
        """`ds` with this stage mapped over it."""
        if self.pool == "actor":
            args = {"compute": ray.data.ActorPoolStrategy(size=1), "fn_constructor_kwargs": self.kwargs}
        else:
            args = {"compute": ray.data.TaskPoolStrategy(workers), "fn_kwargs": self.kwargs}
        if self.cpus is not None:
            args["num_cpus"] = self.cpus
        if self.memory_gb is not None:
            args["memory"] = int(self.memory_gb * 2**30)
        if not self.restart:
            args["max_restarts"] = 0
        return ds.map_batches(self.fn, batch_size=self.batch_size, **args, **worker_env())


def stages(lake: Lake, config: BuildConfig, tokenizer: str | None = None) -> list[Stage]:
    """The whole build, in order, as datatrove writes a pipeline; `tokenizer`: the tokenize stage's checkpoint.

    The first two stages run once per input video; between them the driver skips what the lake
    already holds, and after them it cuts accepted videos into clip specs, which every later stage
    sees. The last stage types the rows for the lake; the driver commits them.
    """
    with_config = {"config": config}
    # Model actors hold a fraction of a CPU: whole-CPU actors on a 2-CPU machine would leave no CPU
    # for the decode tasks feeding them, and the graph would stall. Their memory is what a B-32
    # model's actor was measured to hold on CPU (weights, activations of a batch, the worker itself;
    # Ray Data's issue detector saw the CLIP actor reach 1.4 GiB in make demo, so it asks for 1.8).
    model = {"pool": "actor", "cpus": 0.25, "batch_size": 8}
    embeds = config.clip_model is not None
    return [
        # once per input video
        Stage(hash_inputs),
        Stage(survey_videos, batch_size=1, kwargs=with_config),
        # once per candidate clip
        Stage(read_clip_frames, kwargs=with_config),
        Stage(gate_clips, kwargs=with_config),
        Stage(fingerprints),
        # Weight-free near-duplicates, before the models spend time on them; one actor sees every
        # clip of the build in turn (dedup.py). The dedup actors reserve no CPU: they only compare
        # small arrays, and a 0.05-CPU actor on a 1-CPU node leaves 0.95, which seats no 1-CPU
        # decode task (a two-node cluster of 1-CPU nodes stalled with one such actor on each).
        # Not restarted: a new actor would know the lake's clips but not this build's so far, and
        # pass their copies; its death fails the build, whose re-run resumes (and Ray no longer warns
        # that a restart could lose its constructor's arguments, ray-project/ray#57733).
        *([Stage(FingerprintDeduplicator, **{**model, "cpus": 0}, restart=False, kwargs={
            "lake_root": lake.root, "max_bits": config.fingerprint_max_bits})]
          if config.fingerprint_max_bits is not None else []),
        Stage(thumbnails),
        # Without a caption model the captioner only flags uncaptioned clips: it reserves no CPU, or a
        # 1-CPU node's 0.75 left over would seat no decode task (a 1-CPU build stalled on it).
        Stage(Captioner, **{**model, "cpus": model["cpus"] if config.caption_model else 0},
              memory_gb=2.0 if config.caption_model else None, kwargs={
            "model_name": config.caption_model, "pretrained": config.caption_pretrained,
            "max_tokens": config.caption_max_tokens}),
        *([Stage(ClipEmbedder, **model, memory_gb=1.8, kwargs={
            "model_name": config.clip_model, "pretrained": config.clip_pretrained,
            "min_text_score": config.min_text_score})] if embeds else []),
        Stage(gallery.previews, batch_size=8),
        # Embedding near-duplicates: acts on real weights only (dedup.py).
        *([Stage(Deduplicator, **{**model, "cpus": 0}, kwargs={
            "lake_root": lake.root, "max_distance": config.dedup_max_distance})]
          if embeds and config.dedup_max_distance is not None else []),
        *([Stage(TokenizeClips, **model, kwargs={"checkpoint_dir": tokenizer})] if tokenizer else []),
        Stage(lake_rows, batch_size=None),
    ]


def check_models(config: BuildConfig, lake: Lake) -> None:
    """Stop before any work when the weights asked for are not on this machine (ModelWeightsError)."""
    for model, pretrained in ((config.clip_model, config.clip_pretrained),
                              (config.caption_model, config.caption_pretrained)):
        if model:
            resolve_weights(model, pretrained)
    if config.clip_model:
        check_lake_model(lake, config.clip_model, config.clip_pretrained)  # one embedding space per lake


# Inside the clip pipeline these text columns hold "" for "none", never None: Ray turns a column of
# only None into float, and a float block cannot be concatenated with a text block. lake_rows
# turns "" back into null. Stages added later keep to the same rule.
TEXT_COLUMNS = ("reason", "caption", "dataset", "caption_model", "duplicate_of", "text_model", "text_pretrained")


# -- the build, run ---------------------------------------------------------------------------------


@dataclass
class BuildResult:
    """What one build did: the funnel `gr2 status` prints, and the versions it committed."""

    build_id: str
    funnel: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)


def run_build(sources: list[str], lake: Lake, config: BuildConfig = BuildConfig(), build_id: str | None = None,
              retry_failed: bool = False, extra_stages: tuple[Stage, ...] = (), log=print) -> BuildResult:
    """The whole build: `sources` (directories, globs, manifests, URIs) through `stages` into `lake`,
    then tokens for accepted clips earlier builds left without, the indexes, and the build's row in
    the builds ledger; returns the funnel and the table versions.

    `extra_stages` run after the declared clip stages, before the rows are typed for the lake (a
    stage of your own, a fault to inject).
    """
    started = datetime.now(timezone.utc)
    check_models(config, lake)
    tokenizer = build_tokenizer(lake, config.tokenizer)  # a bad checkpoint stops the build before any video is read
    build_id = build_id or new_build_id()
    *pipeline, to_rows = stages(lake, config, tokenizer)
    funnel = _run_stages(list_inputs(sources), lake, config, build_id, [*pipeline, *extra_stages, to_rows],
                         retry_failed, log)
    funnel.update(model_counts(lake, build_id))
    funnel.update(tokenize_after_build(lake, tokenizer, build_id, log=log))
    if lake.exists("clips"):
        funnel["indexes"] = build_indexes(lake)
    # many small commits leave many small fragments: folded once there are enough to slow reads
    funnel["compaction"] = lake.compact(("inputs", "videos", "clips"), min_fragments=COMPACT_AT_FRAGMENTS)
    versions = lake.record_build(build_id, FLOW, sources, config.model_dump_json(), config.hash(), funnel, started,
                                 ("videos", "clips"))
    return BuildResult(build_id, funnel, versions)


def _run_stages(inputs: list[dict], lake: Lake, config: BuildConfig, build_id: str, pipeline: list[Stage],
                retry_failed: bool, log) -> dict:
    """Inputs through the pipeline's stages into the lake's videos and clips; returns the funnel."""
    t0 = time.time()
    workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    hashing, surveying, *per_clip = pipeline
    hashed = _run_stage(hashing, inputs, workers)
    _commit_inputs(lake, hashed, build_id)
    finished = _finished_videos(lake, {r["video_id"] for r in hashed}, retry_failed)
    failed_before = _failed_uris(lake, {r["uri"] for r in hashed}) if retry_failed else set()
    todo, seen_ids = [], set()
    for r in hashed:
        if r["video_id"] not in finished and r["video_id"] not in seen_ids:
            todo.append(r)
        seen_ids.add(r["video_id"])
    log(f"{build_id}: {len(inputs)} inputs, {len(todo)} to process, {len(hashed) - len(todo)} already in the lake")

    surveyed = _run_stage(surveying, todo, workers)
    video_rows = {v["video_id"]: v for v in map(_plain, surveyed)}
    clips = _commit_clips(lake, video_rows, config, build_id, per_clip, workers)
    clips.frames_decoded += sum(int(v.get("frames_decoded") or 0) for v in surveyed)
    funnel = _funnel(inputs, hashed, finished, lake, video_rows, clips, time.time() - t0, retry_failed)
    if retry_failed:
        retried = [video_rows[r["video_id"]]["status"] for r in todo if r["uri"] in failed_before]
        funnel["retried"] = len(retried)
        funnel["retried_outcomes"] = dict(Counter(retried))
    return funnel


def _run_stage(stage: Stage, items: list[dict], workers: int) -> list[dict]:
    """`stage` over `items` on Ray, gathered on the driver."""
    if not items:
        return []
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), workers * 4)))
    return stage.apply(ds, workers).take_all()


@dataclass
class ClipCounts:
    """What the clip stages did, for the funnel."""

    status: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    frames_decoded: int = 0


def _commit_clips(lake: Lake, video_rows: dict[str, dict], config: BuildConfig, build_id: str,
                  per_clip: list[Stage], workers: int) -> ClipCounts:
    """Every accepted video's clips through the clip stages into the lake, each video's row once all
    of its clips are in (a video without clips at once)."""
    specs = [spec for v in video_rows.values() if v["status"] == "accepted" for spec in clip_specs(v, config, build_id)]
    remaining = Counter(s["video_id"] for s in specs)
    clip_count = Counter(remaining)
    _commit_videos(lake, [v for vid, v in video_rows.items() if remaining[vid] == 0], clip_count, config, build_id)
    counts = ClipCounts()
    if not specs:
        return counts
    ds = ray.data.from_items(specs, override_num_blocks=max(1, min(len(specs), workers * 8)))
    for stage in per_clip:
        ds = stage.apply(ds, workers)
    with progress(len(specs), "build: clips", "clip") as bar:
        _commit_clip_batches(lake, ds, config, video_rows, remaining, clip_count, counts, build_id, bar)
    return counts


def _commit_clip_batches(lake, ds, config, video_rows, remaining, clip_count, counts, build_id, bar) -> None:
    for batch in ds.iter_batches(batch_size=config.commit_every, batch_format="pyarrow"):
        lake.commit("clips", batch)
        counts.frames_decoded += int(pc.sum(pc.list_value_length(batch["sampled_frames"])).as_py() or 0)
        done_videos = []
        for row in batch.select(["video_id", "status", "reason"]).to_pylist():
            counts.status[row["status"]] += 1
            if row["reason"]:
                counts.reasons[f"{row['status']}:{_gate(row['reason'])}"] += 1
            remaining[row["video_id"]] -= 1
            if remaining[row["video_id"]] == 0:
                done_videos.append(video_rows[row["video_id"]])
        _commit_videos(lake, done_videos, clip_count, config, build_id)
        bar.update(len(batch))


def clip_specs(video: dict, config: BuildConfig, build_id: str) -> list[dict]:
    """One candidate-clip row (no frames yet) per window of an accepted video."""
    fps = float(video["fps"])
    return [
        {
            "clip_id": clip_id(video["video_id"], a, b), "video_id": video["video_id"], "uri": video["uri"],
            "local_path": video["local_path"], "width": int(video["width"]), "height": int(video["height"]),
            "shot_index": k, "start_frame": a, "end_frame": b, "start_s": a / fps, "end_s": b / fps,
            "duration_s": (b - a) / fps, "fps": fps, "status": "accepted", "reason": "",
            "caption": video["caption"] or "", "dataset": video["dataset"] or "", "config_hash": config.hash(),
            "build_id": build_id,
        }
        for k, a, b in json.loads(video["windows"])
    ]


def model_counts(lake: Lake, build_id: str) -> dict:
    """Caption sources and near-duplicates among this build's clips, for the funnel."""
    if not lake.exists("clips"):
        return {}
    rows = lake.read("clips", columns=["caption_source", "duplicate_of"],
                     filter=f"build_id = {sql_literal(build_id)}").to_pylist()
    return {**caption.counts(rows), **dedup.counts(rows)}


def _commit_inputs(lake: Lake, hashed: list[dict], build_id: str) -> None:
    """A row per (uri, bytes) the build was given; the first build to see one keeps it."""
    now = datetime.now(timezone.utc)
    rows = [{"input_id": hashlib.sha256(f"{r['uri']}\n{r['video_id']}".encode()).hexdigest()[:32], "uri": r["uri"],
             "video_id": r["video_id"], "caption": r.get("caption"), "dataset": r.get("dataset"),
             "build_id": build_id, "seen_at": now} for r in hashed]
    lake.commit("inputs", rows, update=False)


def _finished_videos(lake: Lake, ids: set[str], retry_failed: bool) -> dict[str, str]:
    """{video_id: status} of the inputs the lake already holds a finished row for. With
    `retry_failed`, a failed video is not finished, nor is an accepted one with a failed clip."""
    if not ids or not lake.exists("videos"):
        return {}
    done = rows_with_ids(lake, "videos", "video_id", ids, ["video_id", "status"])
    retry = _videos_with_failed_clips(lake, ids) if retry_failed else set()
    return {r["video_id"]: r["status"] for r in done
            if r["video_id"] in ids and not (retry_failed and (r["status"] == "failed" or r["video_id"] in retry))}


def rows_with_ids(lake: Lake, table: str, column: str, ids: set[str], columns: list[str],
                  per_lookup: int = 2000, where: str | None = None) -> list[dict]:
    """The rows of `table` whose `column` is one of `ids` (and that match `where`), found through
    the column's index in slices, never by reading the whole table (a 38M-clip lake's videos table
    is gigabytes)."""
    out: list[dict] = []
    ordered = sorted(ids)
    for start in range(0, len(ordered), per_lookup):
        chosen = ", ".join(sql_literal(i) for i in ordered[start:start + per_lookup])
        condition = f"{column} IN ({chosen})" + (f" AND ({where})" if where else "")
        out += lake.read(table, columns=columns, filter=condition).to_pylist()
    return out


def _videos_with_failed_clips(lake: Lake, ids: set[str]) -> set[str]:
    """Which of the videos `ids` have a failed clip in the lake."""
    if not ids or not lake.exists("clips"):
        return set()
    return {r["video_id"] for r in rows_with_ids(lake, "clips", "video_id", ids, ["video_id"], where="status = 'failed'")}


def _failed_uris(lake: Lake, uris: set[str]) -> set[str]:
    """Which of `uris` have a latest outcome in the lake of `failed`, or a video with a failed clip."""
    latest = latest_by_uri(lake, uris)
    retry = _videos_with_failed_clips(lake, {r["video_id"] for r in latest.values()})
    return {u for u, r in latest.items() if r["status"] == "failed" or r["video_id"] in retry}


def latest_by_uri(lake: Lake, uris: set[str] | None = None) -> dict[str, dict]:
    """Each uri's most recent row in `videos` (an input retried after repair has several); uris:
    only those, looked up by uri (None: every uri, a whole-table read for `gr2 status`)."""
    columns = ["video_id", "uri", "status", "reason", "processed_at"]
    if uris is not None:
        rows = rows_with_ids(lake, "videos", "uri", uris, columns) if uris and lake.exists("videos") else []
    else:
        rows = lake.read("videos", columns=columns).to_pylist()
    latest: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["processed_at"] or datetime.min.replace(tzinfo=timezone.utc)):
        latest[r["uri"]] = r
    return latest


def _commit_videos(lake: Lake, rows: list[dict], clip_count: Counter, config: BuildConfig, build_id: str) -> None:
    if not rows:
        return
    now = datetime.now(timezone.utc)
    keep = set(schema.VIDEOS.names) - {"clip_count", "config_hash", "build_id", "processed_at"}
    lake.commit("videos", [
        {**{k: v for k, v in r.items() if k in keep}, "clip_count": clip_count[r["video_id"]],
         "config_hash": config.hash(), "build_id": build_id, "processed_at": now}
        for r in rows
    ])


def _gate(reason: str) -> str:
    """The gate or error kind a reason starts with ("static: motion 0.1 < 0.5" -> "static")."""
    head = reason.split(":", 1)[0].strip()
    return head if head.replace("_", "").isalnum() and len(head) < 32 else "error"


def _funnel(inputs, hashed, finished, lake, video_rows, clips: ClipCounts, elapsed, retry_failed) -> dict:
    by_status: Counter = Counter()
    reasons: dict[str, Counter] = defaultdict(Counter)
    # Every input is counted once, by its outcome in this build or its standing outcome in the lake.
    prior = {}
    if finished:
        prior = {r["video_id"]: r for r in rows_with_ids(lake, "videos", "video_id", set(finished),
                                                          ["video_id", "status", "reason"])}
    seconds = 0.0
    for r in hashed:
        v = video_rows.get(r["video_id"]) or prior.get(r["video_id"]) or {"status": "failed", "reason": "unknown"}
        by_status[v["status"]] += 1
        if v.get("reason"):
            reasons[v["status"]][_reason_key(v["reason"], v["status"])] += 1
        if r["video_id"] in video_rows and v.get("duration_s"):
            seconds += float(v["duration_s"])
    return {
        "inputs": len(inputs),
        "accepted": by_status["accepted"],
        "rejected": by_status["rejected"],
        "failed": by_status["failed"],
        "rejected_by_reason": dict(reasons["rejected"]),
        "failed_by_reason": dict(reasons["failed"]),
        "skipped_already_in_lake": len(hashed) - len(video_rows),
        "processed": len(video_rows),
        "retry_failed": retry_failed,
        "clips": sum(clips.status.values()),
        "clips_accepted": clips.status["accepted"],
        "clips_rejected": clips.status["rejected"],
        "clips_failed": clips.status["failed"],
        "clips_by_reason": dict(clips.reasons),
        "video_seconds": round(seconds, 2),
        "frames_decoded": clips.frames_decoded,
        "elapsed_s": round(elapsed, 2),
        "videos_per_s": round(len(video_rows) / elapsed, 3) if elapsed else None,
        "frames_per_s": round(clips.frames_decoded / elapsed, 1) if elapsed else None,
    }


def _reason_key(reason: str, status: str) -> str:
    """Group reasons: rejections by gate; failures by what went wrong, without the path."""
    if status == "rejected":
        return _gate(reason)
    detail = reason.split(": ", 1)[-1]
    return detail.split(" (")[0][:80]
