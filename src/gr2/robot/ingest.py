"""Robot episodes into the lake: list -> (estimate offsets) -> load, validate, align, encode -> commit.

Ray Data runs the per-episode work (`EpisodeRows`, one episode per batch, an actor pool so a
tokenizer loads once per worker); workers only produce rows, and the driver commits them through
`Lake.commit`, steps before their episode, so an episode row marked accepted always has its
steps and a run killed half-way redoes only what it had not finished.

Identity is content-derived: episode_id hashes the episode's arrays and frames, step_id is the
episode id and the step. An episode already in the lake as accepted or rejected is skipped
before any decoding or encoding; everything else merges on its id, so re-ingest adds nothing.
Every listed episode ends up accepted, rejected (which gate and its score) or failed (the error,
naming the episode, the field and the step).

A source may be a local path or an object-store URI (s3://bucket/prefix): remote.py lists it on the
driver and fetches each episode's files on the worker that loads it.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from gr2.errors import Gr2Error
from gr2.lake import schema
from gr2.lake.lake import actor_args, worker_env
from gr2.lake.provenance import settings_hash
from gr2.lake.uri import is_remote, local_path
from gr2.progress import progress
from gr2.robot import actions as act
from gr2.robot import annotated_json, calvin, hdf5, lerobot, remote
from gr2.robot import layout as lay
from gr2.robot.align import (
    AlignConfig,
    AlignmentError,
    accept_offset,
    align,
    estimation_grid,
    offset_curve,
    pick_offset,
)
from gr2.robot.episode import Episode, EpisodeError, EpisodeRef, encode_jpeg, ref_id
from gr2.video.embed import RANDOM_INIT, TextEmbedder, embedding_dim
from gr2.video.tokenize import FrameTokenizer

READERS = {
    lerobot.FORMAT: lerobot,
    hdf5.ROBOMIMIC: hdf5,
    hdf5.ALOHA: hdf5,
    calvin.FORMAT: calvin,
    annotated_json.FORMAT: annotated_json,
}
# Detection order: the most specific marker first (a LeRobot dir may hold any other file).
DETECT = (lerobot, calvin, annotated_json, hdf5)
DONE = ("accepted", "rejected")


@dataclass(frozen=True)
class IngestConfig:
    """How robot episodes become lake rows; hashed into every row it shaped."""

    cameras: tuple[str, ...] = ()  # views to keep, in this order; empty: every camera, sorted
    frame_width: int | None = None  # JPEG size; None keeps the source's
    frame_height: int | None = None
    jpeg_quality: int = 90
    max_step_hz: float | None = None  # decimate a faster state stream to at most this rate
    tolerance_s: float | None = None  # None: from each camera's own timestamps (align.gap_tolerance)
    offsets_s: dict[str, float] = field(default_factory=dict)  # declared latency per camera
    estimate_cameras: tuple[str, ...] = ()  # cameras whose offset is estimated per source ("*": all)
    estimate_episodes: int = 16  # episodes per source pooled for the estimate
    max_offset_s: float = 0.25
    min_correlation: float = 0.5
    min_steps: int = 2  # shorter: rejected
    max_flagged_fraction: float = 0.5  # more steps flagged: rejected (a view mostly missing)
    tokenizer: str | None = None  # tokenizer checkpoint directory: fills the per-view token grids
    # open_clip text tower that embeds each instruction (None: no embeddings); pretrained: an open_clip
    # tag in the local cache, a checkpoint file, or "none" (a seeded random-init tower, recorded as such)
    text_model: str | None = "ViT-B-32"
    text_pretrained: str = RANDOM_INIT
    concurrency: int = 2  # Ray workers
    commit_every: int = 16  # episodes per lake commit

    def align_config(self, estimated: dict[str, float] | None = None) -> AlignConfig:
        return AlignConfig(
            tolerance_s=self.tolerance_s,
            offsets_s=dict(self.offsets_s),
            estimate_cameras=(),  # estimated per source before the episodes run (estimate_source_offsets)
            estimated_s=dict(estimated or {}),
            max_offset_s=self.max_offset_s,
            min_correlation=self.min_correlation,
        )

    def hash(self) -> str:
        """Hash of everything that shapes rows (not of how many workers made them)."""
        return settings_hash({k: v for k, v in asdict(self).items() if k not in ("concurrency", "commit_every")})

    def widths(self) -> dict[str, int]:
        """The episodes' vector widths: the text model's, for rows without an instruction too."""
        return {"instruction_embedding": embedding_dim(self.text_model)} if self.text_model else {}


@dataclass
class IngestResult:
    build_id: str
    funnel: dict
    versions: dict[str, int]  # table -> Lance version this run committed
    stats: dict[str, str]  # dataset -> uri of its normalisation statistics
    reasons: list[str]  # one line per failed or rejected episode


# -- listing --------------------------------------------------------------------------------------


def reader_for(source: str):
    """The reader module that recognises `source` (a directory or a file)."""
    for reader in DETECT:
        if reader.is_dataset(source):
            return reader
    raise EpisodeError(f"{source}: not a robot dataset this reader knows (LeRobot dir with meta/info.json, "
                       "CALVIN dir with ep_start_end_ids.npy, annotation/*.json, or HDF5 files)")


def list_sources(sources: Iterable[str]) -> tuple[list[EpisodeRef], list[dict]]:
    """Every episode of every source, and a failed-episode row for each source that cannot be listed."""
    refs, failed = [], []
    for source in sources:
        source = source.rstrip("/") if is_remote(source) else os.path.abspath(local_path(source))
        try:
            if is_remote(source):
                found = remote.list_episodes(source, DETECT)
            elif not os.path.exists(source):
                raise EpisodeError(f"{source}: no such file or directory")
            else:
                found = reader_for(source).list_episodes(source)
            if not found:
                raise EpisodeError(f"{source}: no episodes")
            refs.extend(found)
        except Exception as e:  # per-source boundary: a broken source must not stop the others
            ref = EpisodeRef("unknown", source, "*")
            failed.append(_failed_row(ref, ref_id(ref), f"{source}: cannot list episodes ({_describe(e)})"))
    return refs, failed


def load(ref: EpisodeRef) -> Episode:
    """The episode `ref` names; its source must be local (see remote.local_ref)."""
    if ref.format not in READERS:
        raise EpisodeError(f"{ref.uri}: unknown format {ref.format!r}")
    return READERS[ref.format].load_episode(ref)


# -- tokens -------------------------------------------------------------------------------------


def _tokens_u16(grid: np.ndarray, uri: str) -> np.ndarray:
    if grid.size and (grid.min() < 0 or grid.max() > np.iinfo(np.uint16).max):
        raise EpisodeError(f"{uri}: token ids outside uint16 ({grid.min()}..{grid.max()})")
    return grid.astype(np.uint16)


# -- one episode ----------------------------------------------------------------------------------


def process_episode(
    ref: EpisodeRef,
    config: IngestConfig,
    build_id: str,
    tokenizer: Callable[[np.ndarray], np.ndarray] | None = None,
    offsets: dict[str, float] | None = None,
    done: dict[str, str] | None = None,
    offset_error: str | None = None,
    text: TextEmbedder | None = None,
) -> tuple[dict, pa.Table | None]:
    """(episode row, steps table or None) for one episode; never raises for a bad episode.

    `offsets`: per-camera offsets estimated for this episode's source; `done`: episode ids already
    accepted or rejected in the lake (-> a row with status "skipped", nothing decoded);
    `offset_error`: the estimate for this source failed, so its episodes fail with that reason;
    `text`: the TextEmbedder that embeds the instruction.
    """
    episode_id = ref_id(ref)
    local = ref
    try:
        with remote.local_ref(ref) as local:
            episode = load(local)
            episode.ref = ref  # messages and rows name where the episode lives, not its local mirror
            episode_id = episode.content_id()
            if done and episode_id in done:
                return {"episode_id": episode_id, "status": "skipped", "lake_status": done[episode_id]}, None
            episode.validate()
            if offset_error:
                raise AlignmentError(offset_error)
            row, steps = _rows(episode, episode_id, config, build_id, tokenizer, offsets or {})
            return {**row, **instruction_columns(episode.instruction, text)}, steps
    except Exception as e:  # the per-episode boundary: the failure becomes the episode's row
        reason = remote.remote_reason(_describe(e), local, ref)
        if ref.uri not in reason:
            reason = f"{ref.uri}: {reason}"
        return _failed_row(ref, episode_id, reason, config, build_id), None


def instruction_columns(instruction: str | None, text: TextEmbedder | None) -> dict:
    """The instruction's embedding and the text model that made it; nulls without an instruction."""
    if text is None or not (instruction or "").strip():
        return {"instruction_embedding": None, "text_model": None, "text_pretrained": None}
    return {"instruction_embedding": text([instruction])[0].tolist(), "text_model": text.model_name,
            "text_pretrained": text.weights.tag}


def _describe(e: Exception) -> str:
    known = (EpisodeError, AlignmentError)
    return str(e) if isinstance(e, known) else f"{type(e).__name__}: {e}"


def _failed_row(ref: EpisodeRef, episode_id: str, reason: str, config: IngestConfig | None = None, build_id: str = "") -> dict:
    return {
        "episode_id": episode_id,
        "source": ref.source,
        "episode_key": ref.key,
        "format": ref.format,
        "dataset": ref.dataset or None,
        "status": "failed",
        "reason": reason,
        "config_hash": config.hash() if config else None,
        "build_id": build_id,
        "processed_at": datetime.now(timezone.utc),
    }


def _rows(episode: Episode, episode_id: str, config: IngestConfig, build_id: str, tokenizer, offsets) -> tuple[dict, pa.Table | None]:
    ref = episode.ref
    if config.max_step_hz and episode.fps > config.max_step_hz * 1.001:
        # float32 timestamps make 80 Hz read as 80.00007: a hair of slack keeps 80 -> 20 Hz an exact 4.
        episode = episode.every(int(np.ceil(episode.fps / config.max_step_hz - 1e-3)))
    cams = list(config.cameras) or sorted(episode.cameras)
    missing = [c for c in cams if c not in episode.cameras]
    if missing:
        raise EpisodeError(f"{ref.uri}: camera {missing[0]} missing (has {sorted(episode.cameras)})")
    alignment = align(episode, config.align_config(offsets), cams)
    flagged = alignment.flagged
    t = episode.length

    source_layout = episode.action_layout or lay.unknown(np.asarray(episode.action).reshape(len(episode.action), -1).shape[1], "action")
    if episode.end_effector is not None:
        ee = episode.end_effector
        actions = act.ee_delta_actions(ee.pos, ee.quat, ee.effector)
        space = act.ACTION_SPACE
        action_layout = lay.ee_delta(ee.layout if ee.layout is not None else lay.unknown(actions.shape[1] - 6, "effector"))
    else:
        actions, space, action_layout = np.asarray(episode.action, np.float64), "native", source_layout
    config_hash = config.hash()
    row = {
        "episode_id": episode_id,
        "source": ref.source,
        "episode_key": ref.key,
        "format": ref.format,
        "dataset": ref.dataset or None,
        "instruction": episode.instruction,
        "status": "accepted",
        "reason": None,
        "length": t,
        "duration_s": float(episode.timestamps_s[-1] - episode.timestamps_s[0]),
        "state_fps": episode.fps,
        "state_dim": int(episode.state.shape[1]),
        "action_dim": int(actions.shape[1]) if actions.ndim == 2 else 0,
        "action_space": space,
        # what each dimension is, as the reader declared it: normalisation and the model follow it
        "state_layout": lay.to_rows(episode.state_layout or lay.unknown(episode.state.shape[1], "state")),
        "action_layout": lay.to_rows(action_layout),
        "source_action_layout": lay.to_rows(source_layout),
        "cameras": cams,
        "alignment": alignment.report,
        "flagged_steps": int(flagged.sum()),
        "tokenizer_id": getattr(tokenizer, "checkpoint_id", None) if tokenizer is not None else None,
        "config_hash": config_hash,
        "build_id": build_id,
        "processed_at": datetime.now(timezone.utc),
    }
    # Gates: the episode is kept as a row either way, with the gate and its score when rejected.
    if t < config.min_steps:
        return {**row, "status": "rejected", "reason": f"min_steps:{t}"}, None
    fraction = float(flagged.mean())
    if fraction > config.max_flagged_fraction:
        return {**row, "status": "rejected", "reason": f"flagged_fraction:{fraction:.3f}"}, None

    views = [_view_column(episode, v, config, tokenizer) for v in alignment.views]
    if views:
        h, w = views[0]["size"]
        row["frame_width"], row["frame_height"] = w, h
    source_action = np.asarray(episode.action, np.float32)
    steps = []
    for i in range(t):
        flags = [f"view:{v.camera}" for v in alignment.views if not v.ok[i]]
        action = actions[i] if i < len(actions) else None
        if action is None:
            flags.append("action:none")
        steps.append(
            {
                "step_id": f"{episode_id}:{i:06d}",
                "episode_id": episode_id,
                "dataset": ref.dataset or None,
                "step": i,
                "timestamp_s": float(episode.timestamps_s[i]),
                "state": episode.state[i].astype(np.float32).tolist(),
                "action": None if action is None else np.asarray(action, np.float32).tolist(),
                "source_action": source_action[i].tolist() if i < len(source_action) else None,
                "views": [view["entries"][i] for view in views],
                "flags": flags,
                "config_hash": config_hash,
                "build_id": build_id,
            }
        )
    return row, schema.conform("steps", steps)


def _view_column(episode: Episode, view, config: IngestConfig, tokenizer) -> dict:
    """Per step, the view's struct entry; each distinct frame is decoded and encoded once."""
    cam = episode.cameras[view.camera]
    wanted = sorted({int(i) for i in view.frame_index[view.ok]})
    try:
        frames = cam.frames.get(wanted) if wanted else np.zeros((0, 1, 1, 3), np.uint8)
    except EpisodeError:
        raise
    except (OSError, ValueError, Gr2Error) as e:  # bytes no image decoder reads (PIL), a video's DecodeError, h5py
        raise EpisodeError(f"{episode.ref.uri}: camera {view.camera}: cannot decode its frames "
                           f"({type(e).__name__}: {e})") from None
    frames = _resize(frames, config.frame_width, config.frame_height)
    jpegs = {i: encode_jpeg(f, config.jpeg_quality) for i, f in zip(wanted, frames)}
    tokens = {}
    if tokenizer is not None and len(frames):
        grids = _tokens_u16(np.asarray(tokenizer(frames)), episode.ref.uri)
        tokens = {i: g for i, g in zip(wanted, grids)}
    entries = []
    for i in range(episode.length):
        idx, ok = int(view.frame_index[i]), bool(view.ok[i])
        grid = tokens.get(idx) if ok else None
        entries.append(
            {
                "camera": view.camera,
                "ok": ok,
                "jpeg": jpegs[idx] if ok else None,
                "frame_index": idx,
                "timestamp_s": float(view.frame_time_s[i]),
                "skew_s": float(view.skew_s[i]),
                "tokens": grid.reshape(-1).tolist() if grid is not None else None,
                "token_shape": list(grid.shape) if grid is not None else None,
            }
        )
    size = frames.shape[1:3] if len(frames) else (config.frame_height, config.frame_width)
    return {"entries": entries, "size": tuple(int(s) if s else 0 for s in size)}


def _resize(frames: np.ndarray, width: int | None, height: int | None) -> np.ndarray:
    if not len(frames) or (width is None and height is None):
        return frames
    from PIL import Image

    h, w = frames.shape[1:3]
    size = (width or round(w * height / h), height or round(h * width / w))
    if size == (w, h):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames])


# -- the Ray Data stages --------------------------------------------------------------------------


def _refs_from_batch(batch: pa.Table | dict) -> list[EpisodeRef]:
    rows = batch.to_pylist() if isinstance(batch, pa.Table) else [dict(zip(batch, v)) for v in zip(*batch.values())]
    return [EpisodeRef(r["format"], r["source"], r["key"], tuple(r["cameras"] or ()), r["dataset"], tuple(r["files"] or ()))
            for r in rows]


def _ref_item(ref: EpisodeRef) -> dict:
    return {"format": ref.format, "source": ref.source, "key": ref.key, "cameras": list(ref.cameras), "dataset": ref.dataset,
            "files": list(ref.files)}


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


class EpisodeRows:
    """Ray Data stage: episode refs -> (episode row, steps) as Arrow IPC, one output row per episode.

    A class so the tokenizer loads once per actor. Rows travel as Arrow IPC (typed, never pickled)
    because an episode row and its steps have different schemas.
    """

    def __init__(self, config: IngestConfig, build_id: str, done: dict[str, str],
                 offsets: dict[str, dict[str, float]], offset_errors: dict[str, str]):
        self.config, self.build_id, self.done = config, build_id, done
        self.offsets, self.offset_errors = offsets, offset_errors
        self.tokenizer = FrameTokenizer(config.tokenizer) if config.tokenizer else None
        self.text = TextEmbedder(config.text_model, config.text_pretrained) if config.text_model else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids, statuses, episodes, steps = [], [], [], []
        for ref in _refs_from_batch(batch):
            row, table = process_episode(ref, self.config, self.build_id, self.tokenizer,
                                         self.offsets.get(ref.source), self.done, self.offset_errors.get(ref.source),
                                         self.text)
            ids.append(row["episode_id"])
            statuses.append(row["status"])
            episodes.append(json.dumps({"lake_status": row["lake_status"]}).encode() if row["status"] == "skipped"
                            else _ipc(schema.conform("episodes", [row], self.config.widths())))
            steps.append(_ipc(table) if table is not None else b"")
        return pa.table({
            "episode_id": pa.array(ids, pa.string()),
            "status": pa.array(statuses, pa.string()),
            "episode": pa.array(episodes, pa.large_binary()),
            "steps": pa.array(steps, pa.large_binary()),
        })


def offset_curves(batch: pa.Table, config: IngestConfig) -> pa.Table:
    """Ray Data stage: per (episode, estimated camera), the correlation curve over candidate offsets."""
    lags = estimation_grid(config.align_config())
    sources, cams, curves, errors = [], [], [], []
    for ref in _refs_from_batch(batch):
        try:
            with remote.local_ref(ref) as local:
                episode = load(local)
                episode.validate()
                names = [c for c in episode.cameras if c not in config.offsets_s
                         and ("*" in config.estimate_cameras or c in config.estimate_cameras)]
                for name in names:
                    sources.append(ref.source)
                    cams.append(name)
                    curves.append(offset_curve(episode, name, lags).tolist())
                    errors.append(None)
        except Exception as e:  # a bad episode just does not contribute; ingest reports it later
            sources.append(ref.source)
            cams.append("")
            curves.append([])
            errors.append(_describe(e))
    return pa.table({"source": pa.array(sources, pa.string()), "camera": pa.array(cams, pa.string()),
                     "curve": pa.array(curves, pa.list_(pa.float64())), "error": pa.array(errors, pa.string())})


# -- the driver -----------------------------------------------------------------------------------


def estimate_source_offsets(refs: list[EpisodeRef], config: IngestConfig) -> tuple[dict, dict]:
    """({source: {camera: offset}}, {source: reason}) from up to estimate_episodes episodes per source."""
    import ray

    if not config.estimate_cameras:
        return {}, {}
    sample: dict[str, list[EpisodeRef]] = {}
    for ref in refs:
        if len(sample.setdefault(ref.source, [])) < config.estimate_episodes:
            sample[ref.source].append(ref)
    items = [_ref_item(r) for rs in sample.values() for r in rs]
    if not items:
        return {}, {}
    out = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        offset_curves, fn_kwargs={"config": config}, batch_size=1, batch_format="pyarrow",
        # no more tasks than episodes: Ray Data warns of a concurrency its input cannot fill
        compute=ray.data.TaskPoolStrategy(size=min(config.concurrency, len(items))), num_cpus=1, **worker_env(),
    ).take_all()
    lags = estimation_grid(config.align_config())
    curves: dict[tuple[str, str], list] = {}
    for r in out:
        if r["camera"]:
            curves.setdefault((r["source"], r["camera"]), []).append(np.asarray(r["curve"], np.float64))
    offsets: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for (source, camera), cs in sorted(curves.items()):
        try:
            offsets.setdefault(source, {})[camera] = accept_offset(pick_offset(cs, lags), config.align_config(),
                                                                   f"{source}: camera {camera} over {len(cs)} episodes")
        except AlignmentError as e:
            errors[source] = str(e)
    return offsets, errors


def ingest(sources: Iterable[str], lake, config: IngestConfig = IngestConfig(), build_id: str | None = None) -> IngestResult:
    """Ingest every episode of `sources` into `lake`; returns the funnel and the versions committed."""
    build_id = build_id or datetime.now(timezone.utc).strftime("robot-%Y%m%dT%H%M%S%fZ")
    # The text weights are resolved in the workers (EpisodeRows), not here: open_clip imports torchvision
    # and so torch._dynamo, which segfaults in a process that has rendered with osmesa (DESIGN.md).
    refs, listing_failures = list_sources(sources)
    offsets, offset_errors = estimate_source_offsets(refs, config)
    tally, committer = Tally(), Committer(lake, config.commit_every)
    for row in listing_failures:
        tally.listing_failed(row)
        # no config.widths() here: it would import open_clip in the driver (see above); the Committer
        # widens this row's null embedding to the width the episodes beside it carry
        committer.add(schema.conform("episodes", [{**row, "config_hash": config.hash(), "build_id": build_id}]))
    with progress(len(refs), "ingest: episodes", "episode") as bar:
        for out in episode_outputs(refs, config, build_id, _done_ids(lake), offsets, offset_errors):
            rows = tally.take(out)
            if rows is not None:
                committer.add(*rows)
            bar.update()
    committer.flush()
    stats = {d: refresh_stats(lake, d) for d in sorted(tally.datasets)}
    return IngestResult(build_id, tally.funnel(len(refs), len(listing_failures), offsets), committer.versions, stats,
                        tally.reasons)


def episode_outputs(refs: list[EpisodeRef], config: IngestConfig, build_id: str, done: dict[str, str],
                    offsets: dict, offset_errors: dict) -> Iterator[dict]:
    """Every episode of `refs` through `EpisodeRows` on a Ray actor pool, one output row each, as they come."""
    import ray

    if not refs:
        return
    ds = ray.data.from_items([_ref_item(r) for r in refs]).map_batches(
        EpisodeRows,
        fn_constructor_kwargs={"config": config, "build_id": build_id, "done": done,
                               "offsets": offsets, "offset_errors": offset_errors},
        batch_size=1, batch_format="pyarrow", num_cpus=1, **actor_args(),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(config.concurrency, len(refs)))),
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


@dataclass
class Tally:
    """The funnel, counted as episodes come back: outcomes, reasons, and the datasets that gained episodes."""

    counts: Counter = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)  # one line per failed or rejected episode
    datasets: set[str] = field(default_factory=set)  # with new accepted episodes: their stats are refreshed
    seen: set[str] = field(default_factory=set)

    def listing_failed(self, row: dict) -> None:
        self.counts["failed"] += 1
        self.reasons.append(row["reason"])

    def take(self, out: dict) -> tuple[pa.Table, pa.Table | None] | None:
        """Count one `EpisodeRows` output; its (episode row, steps or None) to commit, None when it adds nothing."""
        if out["status"] == "skipped":
            self.counts[json.loads(out["episode"])["lake_status"]] += 1
            self.counts["already_in_lake"] += 1
            return None
        episode, status = _from_ipc(out["episode"]), out["status"]
        self.counts[status] += 1
        if status == "accepted" and out["episode_id"] in self.seen:
            self.counts["duplicates"] += 1  # the same content under two names: its rows once
            return None
        self.seen.add(out["episode_id"])
        self.counts["new"] += 1
        if status != "accepted":
            self.reasons.append(f"{status}: {episode.column('reason')[0].as_py()}")
            return episode, None
        self.datasets.add(episode.column("dataset")[0].as_py() or "default")
        steps = _from_ipc(out["steps"])
        self.counts["steps"] += len(steps)
        self.counts["flagged_steps"] += int(episode.column("flagged_steps")[0].as_py() or 0)
        return episode, steps

    def funnel(self, listed: int, listing_failures: int, offsets: dict) -> dict:
        c = self.counts
        return {
            "episodes": listed + listing_failures,
            "inputs": listed + listing_failures,  # the lake-wide name: inputs = accepted + rejected + failed
            "accepted": c["accepted"],
            "rejected": c["rejected"],
            "failed": c["failed"],
            "new": c["new"] + listing_failures,
            "already_in_lake": c["already_in_lake"],
            "duplicates": c["duplicates"],  # accepted episodes whose content another source already gave
            "steps_added": c["steps"],
            "flagged_steps_added": c["flagged_steps"],
            "offsets_estimated": dict(offsets),
        }


class Committer:
    """The driver's one committer: every `every` episodes, their steps, then their episode rows (so an
    accepted episode row always has its steps)."""

    def __init__(self, lake, every: int):
        self.lake, self.every = lake, every
        self.episodes: list[pa.Table] = []
        self.steps: list[pa.Table] = []
        self.versions: dict[str, int] = {}  # table -> Lance version this run committed

    def add(self, episode: pa.Table, steps: pa.Table | None = None) -> None:
        self.episodes.append(episode)
        if steps is not None:
            self.steps.append(steps)
        if len(self.episodes) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.steps:
            self.versions["steps"] = self.lake.commit("steps", pa.concat_tables(self.steps), update=False)
        if self.episodes:
            self.versions["episodes"] = self.lake.commit("episodes", schema.concat("episodes", self.episodes))
        self.steps.clear()
        self.episodes.clear()


def _done_ids(lake) -> dict[str, str]:
    if not lake.exists("episodes"):
        return {}
    t = lake.read("episodes", columns=["episode_id", "status"])
    return {i: s for i, s in zip(t.column("episode_id").to_pylist(), t.column("status").to_pylist()) if s in DONE}


def refresh_stats(lake, dataset: str) -> str:
    """Recompute a dataset's action and state statistics over all its accepted steps in the lake."""
    import pyarrow.compute as pc

    episodes = lake.read("episodes", columns=["episode_id", "dataset", "status"])
    mine = episodes.filter(pc.and_(pc.equal(episodes["status"], "accepted"),
                                   pc.equal(pc.fill_null(episodes["dataset"], "default"), dataset)))
    ids = mine.column("episode_id")
    steps = lake.read("steps", columns=["episode_id", "state", "action"])
    steps = steps.filter(pc.is_in(steps["episode_id"], value_set=ids))
    out = {"episodes": len(mine), "steps": len(steps)}
    for column in ("action", "state"):
        values = [v for v in steps.column(column).to_pylist() if v is not None]
        widths = Counter(len(v) for v in values)
        if values and len(widths) == 1:
            out[column] = act.compute_stats(np.asarray(values, np.float64))
        elif values:
            out[column] = {"error": f"widths differ across episodes: {dict(widths)}"}
    return act.write_stats(lake, dataset, out)
