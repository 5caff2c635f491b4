"""The video build: a Ray Data graph of small stages from inputs to rows in the lake.

    sources --list--> inputs --hash--> (what the lake or this build already holds, by id) --survey:
    probe, gates, shots, a short video's clip frames--> (each input's outcome to the driver) --> clip
    specs --frames (decoded unless the survey kept them)--> gates --> fingerprints --> near-duplicates
    (weight-free) --> thumbnails --> captions --> embeddings --> previews --> near-duplicates (embeddings)
    --> tokens --> driver commits clips, then each video's row once all of its clips are in --> tokens for
    earlier clips, indexes, the builds ledger.

`stages` declares that list, with how Ray runs each stage; `run_build` runs all of it as one Ray
Data run that streams (no stage waits for the whole input), so a build from Python and one from
`gr2 build-videos` make the same lake.

A video's row is written last, so it marks the video finished: a build killed half-way leaves some
clips and no video row, and the next run redoes that video, merging its clips on their ids.
Workers only produce rows; the driver is the lake's one committer (see lake.py for why).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import queue
import threading
import time
import warnings
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from gr2.lake import gallery, schema
from gr2.lake.index import build_indexes
from gr2.lake.lake import COMPACT_AT_FRAGMENTS, Lake, actor_args, worker_env
from gr2.lake.query import sql_literal
from gr2.progress import progress
from gr2.video import caption, decode, dedup, fingerprint, gates, probe, shots
from gr2.video.caption import Captioner
from gr2.video.config import BuildConfig
from gr2.video.dedup import Deduplicator, FingerprintDeduplicator
from gr2.video.embed import ClipEmbedder, check_lake_model, resolve_weights
from gr2.video.outcomes import VideoOutcomes
from gr2.video.sources import list_inputs
from gr2.video.tokenize import TokenizeClips, build_tokenizer, tokenize_after_build

FLOW = "build-videos"  # a video build's name in the builds ledger

SHOT_FRAME_SIZE = (64, 36)  # frames for cut detection: small, every one of them decoded
# A video whose centre-cropped frames (frame_count x frame_size^2 x 3 bytes, from the probe) fit this is
# decoded once: the survey decodes it at the clips' size, keeps the crops for its clips and shrinks
# copies for the cut detectors. 256 MB holds ~5,400 frames at the default 128 px (3.6 min at 25 fps),
# the short clips most sources are made of; with one survey task per CPU a 2-CPU node keeps 0.5 GB,
# small beside a model actor's ~2 GB. A longer video is surveyed at SHOT_FRAME_SIZE and its clips'
# frames decoded again (read_clip_frames): keeping them all would make memory grow with the video.
KEEP_FRAMES_BYTES = 256 * 2**20


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


def find_held(batch: dict[str, np.ndarray], lake_root: str, outcomes, retry_failed: bool = False
              ) -> dict[str, np.ndarray]:
    """Stage: which inputs need no survey. Adds `held_status`/`held_reason`, the outcome of each video
    the lake already finished ("" for the rest), `copy`: another input of this build surveys the same
    bytes (`outcomes.claim`, see outcomes.py), and `was_failed`: its uri's latest outcome was a failure.

    The batch's ids are looked up through their index (rows_with_ids), never by reading a table, so a
    build asks the lake about its own inputs only, as they come.
    """
    lake = Lake(lake_root)
    ids = [str(v) for v in batch["video_id"]]
    held = _finished_videos(lake, set(ids), retry_failed)
    failed_before = _failed_uris(lake, {str(u) for u in batch["uri"]}) if retry_failed else set()
    todo = [(vid, int(i)) for vid, i in zip(ids, batch["input_index"]) if vid not in held]
    owns = dict(zip(todo, outcomes.claim(todo))) if todo else {}
    return {**batch,
            "held_status": np.array([held[v]["status"] if v in held else "" for v in ids], dtype=object),
            "held_reason": np.array([held[v]["reason"] or "" if v in held else "" for v in ids], dtype=object),
            "copy": np.array([not owns.get((v, int(i)), True) for v, i in zip(ids, batch["input_index"])], dtype=bool),
            "was_failed": np.array([str(u) in failed_before for u in batch["uri"]], dtype=bool)}


def survey_video(item: dict, config: BuildConfig) -> dict:
    """Probe one video, apply the video gates, find its shots and window them into clip specs; a short
    video (KEEP_FRAMES_BYTES) is decoded at its clips' size and its clips' frames kept, so it is decoded once."""
    row = {"status": "accepted", "reason": None, "decoder": None, "windows": [], "shot_count": None,
           "frames_decoded": 0, "survey_frames": b""}
    if item.get("held_status") or item.get("copy"):  # the lake's already, or another input's: nothing to read
        return {**row, "status": item.get("held_status") or "", "reason": item.get("held_reason") or None}
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
    n = config.frames_per_clip
    try:
        frames = SurveyFrames(item["local_path"], info, config)
        frame_count, transitions = shots.find_transitions(frames.shot_chunks(), info["fps"], config)
    except decode.DecodeError as e:
        return {**row, "status": "failed", "reason": str(e)}
    spans = shots.shot_spans(frame_count, transitions)
    windows = shots.windows(spans, info["fps"], config.clip_s, config.cut_margin_frames, frame_count)
    kept = frames.clip_frames(windows, n)
    # Each frame decoded is counted once, here: on the two-pass path read_clip_frames decodes each
    # clip's n sampled frames again.
    row.update(decoder=frames.reader.decoder, frame_count=frame_count, shot_count=len(spans), windows=windows,
               survey_frames=kept, frames_decoded=frame_count + (0 if kept else n * len(windows)))
    return row


def keeps_frames(info: dict, config: BuildConfig) -> bool:
    """Whether the survey keeps a probed video's frames for its clips (KEEP_FRAMES_BYTES): never when its
    clips' frames are smaller than the cut detectors' (they would be scaled up for them)."""
    w, h = decode.fit_size(info["width"], info["height"], config.frame_size)
    return bool(info["frame_count"]) and w >= SHOT_FRAME_SIZE[0] and h >= SHOT_FRAME_SIZE[1] \
        and info["frame_count"] * config.frame_size ** 2 * 3 <= KEEP_FRAMES_BYTES


class SurveyFrames:
    """A video's frames as the survey decodes them: every one at SHOT_FRAME_SIZE for the cut detectors,
    and for a short video (keeps_frames) its clips' frames. Such a video is decoded at the clips' size,
    its frames shrunk for the detectors and their centre crops kept, up to KEEP_FRAMES_BYTES: a video
    with more frames than its probe said keeps none (`whole` turns False), so memory stays bounded."""

    def __init__(self, path: str, info: dict, config: BuildConfig):
        self.size, self.whole = config.frame_size, keeps_frames(info, config)
        shape = decode.fit_size(info["width"], info["height"], self.size) if self.whole else SHOT_FRAME_SIZE
        self.reader = decode.VideoReader(path, *shape)
        self.starts, self.chunks, self.nbytes = [], [], 0

    def shot_chunks(self, size: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Every frame in order at SHOT_FRAME_SIZE, `size` at a time as (first index, frames)."""
        for start, frames in self.reader.chunks(size):
            if self.whole:
                crops = np.ascontiguousarray(decode.center_crop(frames, self.size))  # not a view: the rest is freed
                self.nbytes += crops.nbytes
                self.whole = self.nbytes <= KEEP_FRAMES_BYTES
                if self.whole:
                    self.starts.append(start)
                    self.chunks.append(crops)
                else:  # the probe counted too few frames: the clips' frames are decoded again
                    self.starts, self.chunks = [], []
            small = (self.reader.width, self.reader.height) == SHOT_FRAME_SIZE
            yield start, frames if small else decode.shrink(frames, *SHOT_FRAME_SIZE)

    def clip_frames(self, windows: list[tuple[int, int, int]], n: int) -> bytes:
        """The `n` sampled frames of each window's clip, raw uint8 [windows, n, size, size, 3]; b"" when the
        video was not all kept, or they do not fit KEEP_FRAMES_BYTES (n per window however short: many short
        shots could make them outnumber the frames kept)."""
        if not (self.whole and windows) or len(windows) * n * self.size ** 2 * 3 > KEEP_FRAMES_BYTES:
            return b""
        indices = [f for _, a, b in windows for f in clip_samples(a, b, n)]
        at = [bisect_right(self.starts, i) - 1 for i in indices]
        return np.stack([self.chunks[k][i - self.starts[k]] for k, i in zip(at, indices)]).tobytes()


def clip_samples(start: int, end: int, n: int) -> list[int]:
    """A clip's `n` sampled frame indices; a clip shorter than n frames repeats its last one."""
    idx = shots.sample_indices(start, end, n)
    return (idx + [idx[-1]] * n)[:n]


def survey_videos(batch: dict[str, np.ndarray], config: BuildConfig) -> dict[str, np.ndarray]:
    """Stage: `survey_video` over every row of the batch."""
    keys = list(batch)
    rows = [survey_video(_plain({k: batch[k][i] for k in keys}), config) for i in range(len(batch["uri"]))]
    out = {k: batch[k] for k in keys}
    for k in ("status", "reason", "decoder", "container", "codec", "duration_s", "fps", "frame_count",
              "width", "height", "rotation", "has_audio", "shot_count", "frames_decoded"):
        out[k] = np.array([r.get(k) for r in rows], dtype=object)
    out["windows"] = np.array([json.dumps(r["windows"]) for r in rows], dtype=object)
    out["survey_frames"] = np.array([r["survey_frames"] for r in rows], dtype=object)
    return clean(out)


def report_outcomes(batch: dict[str, np.ndarray], outcomes) -> dict[str, np.ndarray]:
    """Stage: each input's outcome to `outcomes`, the driver's side channel (outcomes.py): its row for
    the inputs table, and unless the lake or another input holds it, its video's row and clip count."""
    keys = list(batch)
    reports = []
    for i in range(len(batch["uri"])):
        r = _plain({k: batch[k][i] for k in keys})
        surveyed = not (r.get("held_status") or r.get("copy"))
        windows = json.loads(r["windows"]) if surveyed and r["status"] == "accepted" else []
        reports.append({
            "index": r["input_index"], "held_status": r.get("held_status") or None,
            "held_reason": r.get("held_reason") or None, "copy": bool(r.get("copy")),
            "was_failed": bool(r.get("was_failed")), "frames_decoded": int(r.get("frames_decoded") or 0),
            "input": {k: r.get(k) for k in ("uri", "video_id", "caption", "dataset")},
            "video": {k: r.get(k) for k in VIDEO_COLUMNS} if surveyed else None, "clips": len(windows)})
    outcomes.report(reports)
    return batch


def cut_clips(video: dict, config: BuildConfig, build_id: str) -> list[dict]:
    """Stage (row to rows): an accepted video this input surveyed as its clip specs; any other, none."""
    video = _plain(video)
    if video.get("held_status") or video.get("copy") or video["status"] != "accepted":
        return []
    return clip_specs(video, config, build_id)


def read_clip_frames(batch: dict[str, np.ndarray], config: BuildConfig) -> dict[str, np.ndarray]:
    """Stage: each clip's sampled frames, centre-cropped square: the ones the survey kept (a short
    video's, KEEP_FRAMES_BYTES), else decoded, resized on decode. The clips of one video in the batch
    are read in one pass, in frame order: their spans are neighbours, and a reader per clip decoded the
    frames between a keyframe and each span again (benchmarks/build_throughput.py's stage breakdown).
    A video that fails so is read clip by clip, so one bad span fails only its clip."""
    batch = clean(batch)
    n, size, count = config.frames_per_clip, config.frame_size, len(batch["clip_id"])
    status, reason = list(batch["status"]), list(batch["reason"])
    sampled = [clip_samples(int(a), int(b), n) for a, b in zip(batch["start_frame"], batch["end_frame"])]
    frames = np.zeros((count, n, size, size, 3), np.uint8)
    by_video: dict[str, list[int]] = defaultdict(list)
    for i, kept in enumerate(batch.pop("survey_frames")):
        if kept:
            frames[i] = np.frombuffer(kept, np.uint8).reshape(n, size, size, 3)
        else:
            by_video[batch["local_path"][i]].append(i)
    for path, rows in by_video.items():
        w, h = decode.fit_size(int(batch["width"][rows[0]]), int(batch["height"][rows[0]]), size)
        wanted = sorted({f for i in rows for f in sampled[i]})
        try:
            got = decode.center_crop(decode.VideoReader(path, w, h).get(wanted), size)
        except decode.DecodeError:  # clip by clip: one bad span fails only its clip
            for i in rows:
                try:
                    frames[i] = decode.center_crop(decode.VideoReader(path, w, h).get(sampled[i]), size)
                except decode.DecodeError as e:
                    status[i], reason[i] = "failed", str(e)
            continue
        at = {f: k for k, f in enumerate(wanted)}
        for i in rows:
            frames[i] = got[[at[f] for f in sampled[i]]]
    return {**batch, "frames": frames, "sampled_frames": _objects([np.array(x, dtype=np.int64) for x in sampled]),
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
    flat: bool = False  # fn maps one row to a list of rows (a video to its clips), not a batch to a batch

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
        # actors are never restarted (gr2.lake.lake.actor_args): a dead one fails the build, whose re-run resumes
        args.update(actor_args() if self.pool == "actor" else worker_env())
        # A streaming build cannot know how many blocks reach a stage: a re-run whose inputs the lake
        # holds sends each clip stage one empty block, and Ray Data warns that `workers` tasks are more
        # than it can use (make demo's second run printed three). The concurrency is a ceiling, not a want.
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for", category=UserWarning)
        if self.flat:
            return ds.flat_map(self.fn, **args)
        return ds.map_batches(self.fn, batch_size=self.batch_size, **args)


def stages(lake: Lake, config: BuildConfig, tokenizer: str | None = None, build_id: str = "",
           outcomes=None, retry_failed: bool = False) -> list[Stage]:
    """The whole build, in order, as datatrove writes a pipeline; `tokenizer`: the tokenize stage's
    checkpoint; `outcomes`: where the per-video stages report each input's fate (outcomes.py);
    `retry_failed`: what the lake holds as failed is surveyed again.

    The first stages run once per input video: hash, find what the lake or this build already holds,
    survey the rest, report every input's outcome, and cut accepted videos into clip specs, which
    every later stage sees. The last stage types the rows for the lake; the driver commits them.
    """
    with_config = {"config": config}
    # Model actors hold a fraction of a CPU: whole-CPU actors on a 2-CPU machine would leave no CPU
    # for the decode tasks feeding them, and the graph would stall. Their memory is what a B-32
    # model's actor was measured to hold on CPU (weights, activations of a batch, the worker itself;
    # Ray Data's issue detector saw the CLIP actor reach 1.4 GiB in make demo, and 1.6 GiB in
    # benchmarks/few_demo_multitask.py's build of 88 videos, where it asked for 1.9: so 2.2).
    model = {"pool": "actor", "cpus": 0.25, "batch_size": 8}
    embeds = config.clip_model is not None
    return [
        # once per input video. Whole blocks (INPUTS_PER_BLOCK inputs): with a batch size, Ray Data
        # joins blocks to fill a batch, and a task hands nothing on until it ends, so one slow input
        # would hold back the ones beside it.
        Stage(hash_inputs, batch_size=None),
        Stage(find_held, batch_size=None, kwargs={
            "lake_root": lake.root, "outcomes": outcomes, "retry_failed": retry_failed}),
        Stage(survey_videos, batch_size=1, kwargs=with_config),
        Stage(report_outcomes, batch_size=None, kwargs={"outcomes": outcomes}),
        Stage(cut_clips, flat=True, kwargs={**with_config, "build_id": build_id}),
        # once per candidate clip
        Stage(read_clip_frames, kwargs=with_config),
        Stage(gate_clips, kwargs=with_config),
        Stage(fingerprints),
        # Weight-free near-duplicates, before the models spend time on them; one actor sees every
        # clip of the build in turn (dedup.py). The dedup actors reserve no CPU: they only compare
        # small arrays, and a 0.05-CPU actor on a 1-CPU node leaves 0.95, which seats no 1-CPU
        # decode task (a two-node cluster of 1-CPU nodes stalled with one such actor on each).
        *([Stage(FingerprintDeduplicator, **{**model, "cpus": 0}, kwargs={
            "lake_root": lake.root, "max_bits": config.fingerprint_max_bits})]
          if config.fingerprint_max_bits is not None else []),
        Stage(thumbnails),
        # Without a caption model the captioner only flags uncaptioned clips: it reserves no CPU, or a
        # 1-CPU node's 0.75 left over would seat no decode task (a 1-CPU build stalled on it).
        Stage(Captioner, **{**model, "cpus": model["cpus"] if config.caption_model else 0},
              memory_gb=2.0 if config.caption_model else None, kwargs={
            "model_name": config.caption_model, "pretrained": config.caption_pretrained,
            "max_tokens": config.caption_max_tokens}),
        *([Stage(ClipEmbedder, **model, memory_gb=2.2, kwargs={
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
    with _outcomes_actor(build_id) as outcomes:
        *pipeline, to_rows = stages(lake, config, tokenizer, build_id, outcomes, retry_failed)
        funnel = _run_stages(list_inputs(sources), lake, config, build_id, [*pipeline, *extra_stages, to_rows],
                             outcomes, retry_failed, log)
    funnel.update(model_counts(lake, build_id))
    funnel.update(tokenize_after_build(lake, tokenizer, build_id, log=log))
    if lake.exists("clips"):
        funnel["indexes"] = build_indexes(lake)
    # many small commits leave many small fragments: folded once there are enough to slow reads
    funnel["compaction"] = lake.compact(("inputs", "videos", "clips"), min_fragments=COMPACT_AT_FRAGMENTS)
    versions = lake.record_build(build_id, FLOW, sources, config.model_dump_json(), config.hash(), funnel, started,
                                 ("videos", "clips"))
    return BuildResult(build_id, funnel, versions)


# The build is ONE Ray Data run, inputs to clip rows: a run costs seconds to start, its model actors
# load once, and the fingerprint dedup actor reads the lake once (the windowed runs tried before were
# 1.3-1.6x slower for paying these per window). Only clip rows come out of it, so each input's own
# fate (its inputs row, its video's row, how many clips to wait for) comes to the driver through a
# side channel, a small actor (outcomes.py) the report stage writes and the driver drains. The
# driver keeps only what is in flight: outcomes not yet committed, and videos whose clips are not
# all in; the funnel is counters.
# Inputs per block, at most: a task hands its rows on when it ends, so smaller blocks bring the first
# clips sooner, but every block is a task in each of a dozen operators, and on a loaded 2-core machine
# blocks of 4 made the 200-input build twice as slow as blocks of 16 (209 s against 108 s).
INPUTS_PER_BLOCK = 16
MAX_INPUT_BLOCKS = 10_000  # past this, blocks grow instead: Ray Data schedules every block as a task
TICK_S = 1.0  # the driver drains the outcomes at least this often, clips or not
# A clips commit merges on the id, which reads every id the table holds (Lake.commit), so its cost
# grows with the table: ~40 ms at 10k rows, ~150 ms at 1M, ~1.4 s projected at 38M
# (benchmarks/results/lake_scale.json). Clips wait in the driver after each commit for
# COMMIT_PAUSE times as long as it took, so committing takes at most 1/(1 + COMMIT_PAUSE) of the
# driver's time whatever the table's size (unless the buffer fills first), and a commit carries more
# clips as the table grows, up to CLIP_BUFFER_COMMITS x commit_every of them (16 x 256 clip rows:
# ~70 MB of Arrow in the driver).
COMMIT_PAUSE = 9.0
CLIP_BUFFER_COMMITS = 16


class _RemoteOutcomes:
    """`VideoOutcomes`'s methods on the build's actor, so the stages calling them know nothing of Ray.
    Calls wait for the actor: an outcome is recorded before the rows it concerns move on."""

    def __init__(self, actor):
        self.actor = actor

    def claim(self, inputs: list[tuple[str, int]]) -> list[bool]:
        return ray.get(self.actor.claim.remote(inputs))

    def report(self, outcomes: list[dict]) -> None:
        ray.get(self.actor.report.remote(outcomes))

    def take(self, limit: int = 1000) -> list[dict]:
        return ray.get(self.actor.take.remote(limit))

    def waiting(self) -> int:
        return ray.get(self.actor.waiting.remote())


@contextlib.contextmanager
def _outcomes_actor(build_id: str) -> Iterator[_RemoteOutcomes]:
    """The build's outcomes actor (named for the build, so `ray list actors` shows whose it is, and for
    the attempt: a retried build's old actor may not have let go of its name yet): no CPU, never
    restarted (a new one would have lost what it held; the build fails and its re-run resumes)."""
    name = f"gr2-outcomes-{build_id}-{time.time_ns() % 10**9:09d}"
    actor = ray.remote(VideoOutcomes).options(name=name, num_cpus=0, max_restarts=0).remote()
    try:
        yield _RemoteOutcomes(actor)
    finally:
        ray.kill(actor)


def _run_stages(inputs: list[dict], lake: Lake, config: BuildConfig, build_id: str, pipeline: list[Stage],
                outcomes, retry_failed: bool, log) -> dict:
    """Inputs through the pipeline's stages into the lake's inputs, videos and clips; returns the funnel."""
    t0 = time.time()
    workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    total = len(inputs)
    log(f"{build_id}: {total} inputs")
    committer = Committer(lake, config, build_id)
    if inputs:
        for i, item in enumerate(inputs):
            item["input_index"] = i  # the input's key in the outcomes (a uri can be named with two errors)
        blocks = min(total, max(workers * 4, -(-total // INPUTS_PER_BLOCK)), MAX_INPUT_BLOCKS)
        ds = ray.data.from_items(inputs, override_num_blocks=blocks)
        del inputs  # Ray's object store holds them now
        # No per-operator reservations: Ray Data would set a share of the CPUs aside for each of the
        # dozen operators, a fraction of a CPU each on a small node, and while a per-video task holds
        # a CPU for long (a long survey, a slow read) the clip operators' shares seat no task, so the
        # clips of videos already surveyed wait for it. Operators then draw on one pool; the
        # downstream-capacity backpressure still keeps an early stage from running far ahead.
        ds.context.op_resource_reservation_enabled = False
        for stage in pipeline:
            ds = stage.apply(ds, workers)
        with progress(total, "build: inputs", "input") as bar:
            committer.bar = bar
            # prefetch_batches=0: with prefetching, Ray Data's iterator holds each block until the next
            # one arrives (it fetches ahead before yielding), so one slow video would hold back every clip.
            rows = ds.iter_batches(batch_size=config.commit_every, batch_format="pyarrow", prefetch_batches=0)
            for batch in _read_ahead(rows, TICK_S):
                _drain(outcomes, committer)
                if batch is not IDLE:
                    committer.clips(batch)
                committer.flush()
            _drain(outcomes, committer)
            committer.flush(force=True)
        if outcomes.waiting() or committer.pending():
            log(f"{build_id}: {outcomes.waiting()} copies without their video's outcome, {committer.pending()} "
                "videos without all their clips; their rows are left for the next build")
    t = committer.tally
    log(f"{build_id}: {t.processed} processed, {t.skipped} already in the lake or named twice")
    return _funnel(total, t, time.time() - t0, retry_failed)


def _drain(outcomes, committer: Committer) -> None:
    """Every outcome reported so far to the committer, a slice at a time, committed as they fill commits."""
    while taken := outcomes.take():
        committer.take(taken)
        committer.flush()


IDLE = object()  # what `_read_ahead` yields when nothing came for a while


def _read_ahead(items: Iterator, idle_s: float, depth: int = 2) -> Iterator:
    """`items`, pulled on a thread of their own while the caller works (a few ahead, `depth`);
    yields IDLE each time none has come for `idle_s`, so the caller can use the wait."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    end, stop = object(), threading.Event()

    def hand_on(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=1.0)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> None:
        it = iter(items)
        try:
            for item in it:
                if not hand_on(item):
                    return  # the caller gave up (it raised): stop pulling, so the Ray Data run ends
            hand_on(end)
        except BaseException as e:  # handed to the caller's thread, raised there
            hand_on(_Raised(e))
        finally:
            if hasattr(it, "close"):
                it.close()

    puller = threading.Thread(target=pull, name="gr2-build-output", daemon=True)
    puller.start()
    try:
        while True:
            try:
                item = ready.get(timeout=idle_s)
            except queue.Empty:
                yield IDLE
                continue
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        puller.join(timeout=30)


@dataclass
class _Raised:
    error: BaseException


@dataclass
class Tally:
    """What the build did, for the funnel: counted as inputs and clips pass, never by keeping them."""

    status: Counter = field(default_factory=Counter)  # every input, by its outcome
    reasons: dict = field(default_factory=lambda: defaultdict(Counter))
    processed: int = 0  # videos surveyed by this build (one input per content)
    skipped: int = 0  # inputs the lake had finished, or whose bytes another input of this build surveyed
    video_seconds: float = 0.0
    retried: Counter = field(default_factory=Counter)
    clip_status: Counter = field(default_factory=Counter)
    clip_reasons: Counter = field(default_factory=Counter)
    frames_decoded: int = 0  # as each video's survey counts them (survey_video)
    clip_commits: int = 0

    def outcome(self, status: str, reason: str | None) -> None:
        """Count one input by its outcome."""
        self.status[status] += 1
        if reason:
            self.reasons[status][_reason_key(reason, status)] += 1


class Committer:
    """The driver's half of the build, the lake's one committer: inputs rows, clip rows as they come,
    a video's row at once when it has no clips, else once all of its clips are committed (so a killed
    build leaves that video unfinished, to be redone)."""

    def __init__(self, lake: Lake, config: BuildConfig, build_id: str):
        self.lake, self.config, self.build_id, self.bar = lake, config, build_id, None
        self.tally = Tally()
        self.inputs: list[dict] = []  # rows for the inputs table, not committed yet
        self.videos: list[dict] = []  # finished videos' rows, not committed yet
        self.clip_count: dict[str, int] = {}
        self.waiting: dict[str, tuple[dict, int]] = {}  # video_id -> (row, clips) of videos with clips to come
        self.arrived: Counter = Counter()  # clips committed per video whose row is not committed yet
        self.last_flush = time.monotonic()
        self.buffered: list[pa.Table] = []  # clip rows waiting for the next clips commit
        self.clips_due = 0.0  # monotonic time after which buffered clips are committed (COMMIT_PAUSE)

    def take(self, outcomes: list[dict]) -> None:
        """Inputs' outcomes from the report stage (outcomes.py)."""
        t = self.tally
        for o in outcomes:
            self.inputs.append(o["input"])
            video = o["video"]
            if video is None:  # the lake's (held) or another input's (a copy, with its video's outcome)
                t.outcome(o["held_status"] or o["status"], o["held_reason"] if o["held_status"] else o["reason"])
                t.skipped += 1
                continue
            t.outcome(video["status"], video.get("reason"))
            t.processed += 1
            t.video_seconds += float(video.get("duration_s") or 0)
            t.frames_decoded += o["frames_decoded"]
            if o["was_failed"]:
                t.retried[video["status"]] += 1
            self._expect(video, o["clips"])
        if self.bar is not None:
            self.bar.update(len(outcomes))

    def _expect(self, video: dict, clips: int) -> None:
        vid = video["video_id"]
        if self.arrived[vid] >= clips:  # no clips, or all in before the outcome was taken
            self.arrived.pop(vid, None)
            self.videos.append(video)
            self.clip_count[vid] = clips
        else:
            self.waiting[vid] = (video, clips)

    def clips(self, batch: pa.Table) -> None:
        """A batch of typed clip rows, committed with the ones before it once a commit is due."""
        self.buffered.append(batch)
        self.flush_clips()

    def flush_clips(self, force: bool = False) -> None:
        """Commit the buffered clips when the pause after the last commit is over (COMMIT_PAUSE), the buffer
        is full or `force`; count them, and queue the videos they complete."""
        rows = sum(len(b) for b in self.buffered)
        if not rows or not (force or time.monotonic() >= self.clips_due
                            or rows >= CLIP_BUFFER_COMMITS * self.config.commit_every):
            return
        batch = pa.concat_tables(self.buffered) if len(self.buffered) > 1 else self.buffered[0]
        started = time.monotonic()
        self.lake.commit("clips", batch)
        done = time.monotonic()
        self.buffered, self.clips_due = [], done + COMMIT_PAUSE * (done - started)
        t = self.tally
        t.clip_commits += 1
        for row in batch.select(["video_id", "status", "reason"]).to_pylist():
            t.clip_status[row["status"]] += 1
            if row["reason"]:
                t.clip_reasons[f"{row['status']}:{_gate(row['reason'])}"] += 1
            vid = row["video_id"]
            self.arrived[vid] += 1
            if vid in self.waiting and self.arrived[vid] >= self.waiting[vid][1]:
                video, clips = self.waiting.pop(vid)
                self.arrived.pop(vid)
                self.videos.append(video)
                self.clip_count[vid] = clips

    def flush(self, force: bool = False) -> None:
        """Commit the clips that are due (flush_clips), then the inputs rows and the finished videos'
        rows: at once when a video's last clips have just come in, else once there are `commit_every`
        rows or a tick has passed (few commits: each leaves a fragment)."""
        self.flush_clips(force)
        if not (self.inputs or self.videos):
            return
        due = force or any(self.clip_count.values()) or len(self.inputs) + len(self.videos) >= \
            self.config.commit_every or time.monotonic() - self.last_flush >= TICK_S
        if not due:
            return
        _commit_inputs(self.lake, self.inputs, self.build_id)
        _commit_videos(self.lake, self.videos, self.clip_count, self.config, self.build_id)
        self.inputs, self.videos, self.clip_count = [], [], {}
        self.last_flush = time.monotonic()

    def pending(self) -> int:
        """Videos with clips still to come."""
        return len(self.waiting)


def clip_specs(video: dict, config: BuildConfig, build_id: str) -> list[dict]:
    """One candidate-clip row per window of an accepted video, with its frames when the survey kept them
    (`survey_frames`, raw uint8 [frames_per_clip, frame_size, frame_size, 3]; b"": read_clip_frames decodes
    them). Bytes, not arrays: an Arrow binary column whether or not a clip has them."""
    fps = float(video["fps"])
    kept, per_clip = video["survey_frames"], config.frames_per_clip * config.frame_size ** 2 * 3
    return [
        {
            "clip_id": clip_id(video["video_id"], a, b), "video_id": video["video_id"], "uri": video["uri"],
            "local_path": video["local_path"], "width": int(video["width"]), "height": int(video["height"]),
            "shot_index": k, "start_frame": a, "end_frame": b, "start_s": a / fps, "end_s": b / fps,
            "duration_s": (b - a) / fps, "fps": fps, "status": "accepted", "reason": "",
            "caption": video["caption"] or "", "dataset": video["dataset"] or "", "config_hash": config.hash(),
            "build_id": build_id, "survey_frames": kept[j * per_clip:(j + 1) * per_clip],
        }
        for j, (k, a, b) in enumerate(json.loads(video["windows"]))
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
    if not hashed:
        return
    now = datetime.now(timezone.utc)
    rows = [{"input_id": hashlib.sha256(f"{r['uri']}\n{r['video_id']}".encode()).hexdigest()[:32], "uri": r["uri"],
             "video_id": r["video_id"], "caption": r.get("caption"), "dataset": r.get("dataset"),
             "build_id": build_id, "seen_at": now} for r in hashed]
    lake.commit("inputs", rows, update=False)


def _finished_videos(lake: Lake, ids: set[str], retry_failed: bool) -> dict[str, dict]:
    """{video_id: {status, reason}} of the inputs the lake already holds a finished row for. With
    `retry_failed`, a failed video is not finished, nor is an accepted one with a failed clip."""
    if not ids or not lake.exists("videos"):
        return {}
    done = rows_with_ids(lake, "videos", "video_id", ids, ["video_id", "status", "reason"])
    retry = _videos_with_failed_clips(lake, ids) if retry_failed else set()
    return {r["video_id"]: r for r in done
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


# A surveyed video's columns of its lake row; the build adds the rest when it commits the row.
VIDEO_COLUMNS = tuple(n for n in schema.VIDEOS.names if n not in ("clip_count", "config_hash", "build_id",
                                                                   "processed_at"))


def _commit_videos(lake: Lake, rows: list[dict], clip_count: dict[str, int], config: BuildConfig,
                   build_id: str) -> None:
    """The videos' rows, each marking its video finished: committed once all of its clips are in."""
    if not rows:
        return
    now = datetime.now(timezone.utc)
    lake.commit("videos", [
        {**{k: r.get(k) for k in VIDEO_COLUMNS}, "clip_count": clip_count.get(r["video_id"], 0),
         "config_hash": config.hash(), "build_id": build_id, "processed_at": now}
        for r in rows
    ])


def _gate(reason: str) -> str:
    """The gate or error kind a reason starts with ("static: motion 0.1 < 0.5" -> "static")."""
    head = reason.split(":", 1)[0].strip()
    return head if head.replace("_", "").isalnum() and len(head) < 32 else "error"


def _funnel(inputs: int, t: Tally, elapsed: float, retry_failed: bool) -> dict:
    """The build's funnel: every input counted once, by its outcome in this build or its standing
    outcome in the lake (inputs = accepted + rejected + failed)."""
    funnel = {
        "inputs": inputs,
        "accepted": t.status["accepted"],
        "rejected": t.status["rejected"],
        "failed": t.status["failed"],
        "rejected_by_reason": dict(t.reasons["rejected"]),
        "failed_by_reason": dict(t.reasons["failed"]),
        "skipped_already_in_lake": t.skipped,
        "processed": t.processed,
        "retry_failed": retry_failed,
        "clips": sum(t.clip_status.values()),
        "clips_accepted": t.clip_status["accepted"],
        "clips_rejected": t.clip_status["rejected"],
        "clips_failed": t.clip_status["failed"],
        "clips_by_reason": dict(t.clip_reasons),
        "video_seconds": round(t.video_seconds, 2),
        "frames_decoded": t.frames_decoded,
        "clip_commits": t.clip_commits,
        "elapsed_s": round(elapsed, 2),
        "videos_per_s": round(t.processed / elapsed, 3) if elapsed else None,
        "frames_per_s": round(t.frames_decoded / elapsed, 1) if elapsed else None,
    }
    if retry_failed:
        funnel["retried"] = sum(t.retried.values())
        funnel["retried_outcomes"] = dict(t.retried)
    return funnel


def _reason_key(reason: str, status: str) -> str:
    """Group reasons: rejections by gate; failures by what went wrong, without the path."""
    if status == "rejected":
        return _gate(reason)
    detail = reason.split(": ", 1)[-1]
    return detail.split(" (")[0][:80]
