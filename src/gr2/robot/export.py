"""Accepted lake episodes out as LeRobot v3.0 datasets, which LeRobot's own `LeRobotDataset` loads.

What a LeRobot learner gets, and the decisions behind it:

- One fps per dataset (LeRobot v3 has one clock). Episodes are grouped by their state rate; each
  rate becomes a dataset of its own (`<out>/<fps>hz` when the selection holds several rates, `<out>`
  itself when it holds one). Nothing is resampled: every exported step is a lake step with its own
  state, action and views. A step's `timestamp` is `frame_index / fps`; an episode whose state clock
  strays from that grid by more than a quarter period is skipped with the reason, never relabelled.
- Views: the lake's per-step JPEGs, already aligned to the state clock, encoded per camera into
  H.264 mp4s (many episodes per file, as v3 does) so that the frame of step t is presented at
  exactly t / fps after the episode's `from_timestamp`: LeRobot decodes by timestamp and allows
  1e-4 s. A step whose view was flagged (no frame within tolerance) cannot be left out of a fixed
  clock, so it shows its camera's nearest good frame and says so: `gr2.view_ok` is false there.
- Actions: the lake's `action` in its action space, with named dimensions (ee_delta:
  dx dy dz rx ry rz + effector; native: the source's names). ee_delta has no action after the last
  pose; LeRobot needs one, so that step gets zero motion with the effector held (the robot stays
  where the episode ended) and `gr2.action_ok` false. A native null action holds the previous one.
- The instruction is the episode's task; `meta/stats.json` holds statistics of the exported
  values (actions over the real ones only); `meta/episodes` records each episode's lake id.

Plain functions over `Lake.read`; ffmpeg (through ffmpeg-python) encodes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gr2.errors import Gr2Error
from gr2.progress import Progress
from gr2.robot import actions as act
from gr2.robot import layout as lay
from gr2.robot import lerobot
from gr2.robot.episode import decode_jpeg, video_timestamps

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
VIEW_OK = lerobot.VIEW_OK_KEY  # not observation.* nor action.*: LeRobot policies leave it out of their inputs
ACTION_OK = "gr2.action_ok"
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # the quantiles LeRobot's stats carry
READ_BATCH = 32  # episodes whose steps one lake read fetches


class ExportError(Gr2Error):
    """An export that cannot be made (nothing selected, a bad filter, an existing dataset, ffmpeg)."""


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how to encode it."""

    where: str | None = None  # SQL over the episodes table, ANDed with status = 'accepted'
    cameras: tuple[str, ...] = ()  # views to export, in order; empty: the first episode's cameras
    fps: int | None = None  # export only episodes at this state rate (one dataset at `out`)
    crf: int = 18  # H.264 quality: the lake's JPEGs are already lossy
    gop: int = 2  # keyframe interval: LeRobot's own choice, so a random frame decodes fast
    chunks_size: int = 1000  # files per chunk directory
    data_files_size_in_mb: int = 100  # LeRobot's defaults: a new file once one passes this
    video_files_size_in_mb: int = 200


@dataclass
class DatasetReport:
    """One exported LeRobot dataset."""

    root: str
    fps: int
    episodes: int = 0
    frames: int = 0
    cameras: list[str] = field(default_factory=list)
    held_views: int = 0  # steps whose view was flagged in the lake: nearest good frame, gr2.view_ok false
    filled_actions: int = 0  # steps with no action in the lake: filled, gr2.action_ok false
    max_clock_error_s: float = 0.0  # largest distance of a lake step time from frame_index / fps


@dataclass
class ExportResult:
    datasets: list[DatasetReport]
    skipped: list[str]  # one line per selected episode that was not exported, with the reason

    def summary(self) -> str:
        """What the export wrote and decided, for people."""
        lines = []
        for d in self.datasets:
            cams = ", ".join(d.cameras) or "none"
            lines.append(f"{d.root}: LeRobot {CODEBASE_VERSION}, {d.fps} fps, {d.episodes} episodes, "
                         f"{d.frames} frames, cameras {cams} (lake step times within "
                         f"{d.max_clock_error_s * 1000:.2f} ms of frame_index/fps)")
        if len(self.datasets) > 1:
            rates = ", ".join(f"{d.fps}" for d in self.datasets)
            lines.append(f"the selection runs at {len(self.datasets)} state rates ({rates} Hz): LeRobot v3 holds "
                         "one fps per dataset, so each rate is a dataset of its own; nothing was resampled")
        held = sum(d.held_views for d in self.datasets)
        if held:
            lines.append(f"{held} steps had a flagged view (no frame within tolerance): each shows its camera's "
                         f"nearest good frame and has {VIEW_OK} false for that camera")
        filled = sum(d.filled_actions for d in self.datasets)
        if filled:
            lines.append(f"{filled} steps had no action (the last step of ee_delta episodes): zero motion with the "
                         f"effector held, {ACTION_OK} false")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} episodes:")
            lines += [f"  {s}" for s in self.skipped]
        return "\n".join(lines)


# -- choosing what to export ----------------------------------------------------------------------


def select_episodes(lake, where: str | None = None) -> pa.Table:
    """Accepted episodes matching `where` (SQL over the episodes table), in a stable order."""
    accepted = "status = 'accepted'"
    try:
        table = lake.read("episodes", filter=f"{accepted} AND ({where})" if where else accepted)
    except (ValueError, OSError) as e:
        raise ExportError(f"--where {where!r}: {' '.join(str(e).split())[:300]}") from None
    return table.sort_by([("source", "ascending"), ("episode_key", "ascending")])


def state_rate(state_fps: float | None) -> int | None:
    """The integer rate LeRobot's `fps` would hold for an episode (None: fewer than two steps)."""
    return int(round(state_fps)) if state_fps and state_fps >= 0.5 else None


def clock_error_s(timestamps_s: np.ndarray, fps: int) -> float:
    """Largest distance of the steps' times (from the first) to frame_index / fps."""
    t = np.asarray(timestamps_s, np.float64)
    return float(np.max(np.abs(t - t[0] - np.arange(len(t)) / fps))) if len(t) else 0.0


def feature_layout(row: dict, column: str, width: int) -> lay.Layout:
    """A state or action vector's layout as the lake declares it; positional names for a row that
    declares none or another width."""
    declared = lay.from_rows(row.get(f"{column}_layout"))
    return declared if declared is not None and len(declared) == width else lay.unknown(width, column)


# -- one episode's values -------------------------------------------------------------------------


def nearest_ok(ok: np.ndarray) -> np.ndarray:
    """For each step, the nearest step whose view is ok (the earlier one on a tie)."""
    good = np.flatnonzero(ok)
    steps = np.arange(len(ok))
    right = np.clip(np.searchsorted(good, steps), 0, len(good) - 1)
    left = np.clip(right - 1, 0, len(good) - 1)
    use_left = np.abs(good[left] - steps) <= np.abs(good[right] - steps)
    return np.where(use_left, good[left], good[right])


def filled_actions(actions: list, space: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    """([T, A] actions with nulls filled, [T] ok); see the module docstring for the fill."""
    out = np.zeros((len(actions), width), np.float32)
    ok = np.array([a is not None for a in actions], bool)
    for i, a in enumerate(actions):
        if a is not None:
            out[i] = a
        elif i > 0 and space == act.ACTION_SPACE:
            out[i, 6:] = out[i - 1, 6:]  # zero motion, the effector command held
        elif i > 0:
            out[i] = out[i - 1]
    return out, ok


# -- ffmpeg ---------------------------------------------------------------------------------------


class VideoFile:
    """One camera's mp4 being written: raw RGB frames in, H.264 out, frame n presented at n / fps."""

    def __init__(self, path: str, width: int, height: int, fps: int, crf: int, gop: int):
        import ffmpeg

        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.fps, self.frames = path, fps, 0
        # No B-frames: then the mp4 needs no edit list, and presentation times start at 0.
        # The rawvideo input's clock is n / fps; mp4 keeps it exactly (its timescale is a multiple of fps).
        self._proc = (
            ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
            .output(path, vcodec="libx264", pix_fmt="yuv420p", crf=crf, g=gop, bf=0, movflags="+faststart")
            .global_args("-loglevel", "error", "-nostdin")
            .overwrite_output()
            .run_async(pipe_stdin=True, pipe_stderr=True)
        )

    def write(self, frames: np.ndarray) -> None:
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames, np.uint8).tobytes())
        except BrokenPipeError:
            self.close()  # raises with ffmpeg's message
        self.frames += len(frames)

    def close(self) -> None:
        self._proc.stdin.close()
        err = self._proc.stderr.read().decode(errors="replace")
        if self._proc.wait() != 0:
            raise ExportError(f"ffmpeg could not encode {self.path}: {err.strip()[-300:]}")
        # The one promise LeRobot's decoder relies on; checked, not assumed.
        pts = video_timestamps(self.path)
        if len(pts) != self.frames or not np.allclose(pts, np.arange(self.frames) / self.fps, rtol=0, atol=1e-6):
            raise ExportError(f"{self.path}: wrote {self.frames} frames at n / {self.fps} s, the mp4 presents "
                              f"{len(pts)} at other times")


# -- one LeRobot dataset --------------------------------------------------------------------------


class DatasetWriter:
    """Writes one LeRobot v3.0 dataset: episodes go in one at a time; `close` writes meta/."""

    def __init__(self, root: str, fps: int, config: ExportConfig):
        self.root, self.fps, self.config = root, fps, config
        self.report = DatasetReport(root=root, fps=fps)
        self.layout: dict | None = None  # fixed by the first episode: widths, names, cameras, sizes
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.rows: list[pa.Table] = []  # the current data file's rows
        self.videos: dict[str, VideoFile] = {}
        self.file_index = 0
        self.file_frames = 0  # frames already in the current data and video files
        self.values = {"observation.state": [], "action": []}
        self.pixels: dict[str, np.ndarray] = {}  # camera -> per-channel histogram of 0..255

    # The layout every episode must share; the first episode sets it.
    def _layout_of(self, row: dict, steps: pa.Table) -> dict:
        cams = list(self.config.cameras) or list(row["cameras"] or [])
        state_w = len(steps.column("state")[0].as_py())
        action_w = int(row["action_dim"] or 0)
        return {
            "cameras": cams,
            "action_space": row["action_space"],
            "state_layout": feature_layout(row, "state", state_w),
            "action_layout": feature_layout(row, "action", action_w),
        }

    def check(self, row: dict, steps: pa.Table) -> str | None:
        """Why this episode cannot join the dataset, or None."""
        layout = self._layout_of(row, steps)
        if self.layout is None:
            return None
        # Cameras are not compared: an episode needs the dataset's, and episode_frames says when one lacks them.
        if layout["action_space"] != self.layout["action_space"]:
            return f"action space {layout['action_space']} differs from the dataset's {self.layout['action_space']}"
        for key, what in (("state_layout", "state dimensions"), ("action_layout", "action dimensions")):
            if not lay.same(layout[key], self.layout[key]):
                return (f"{what} {lay.names(layout[key])} differ from the dataset's {lay.names(self.layout[key])} "
                        "(names, units, modes or grippers)")
        return None

    def add(self, row: dict, steps: pa.Table, frames: dict[str, np.ndarray], view_ok: np.ndarray) -> None:
        """Append one checked episode: its steps in order, its decoded frames per camera ([T, H, W, 3])."""
        if self.layout is None:
            self.layout = self._layout_of(row, steps)
            self.layout["sizes"] = {c: frames[c].shape[1:3] for c in self.layout["cameras"]}
            self.report.cameras = list(self.layout["cameras"])
            os.makedirs(self.root, exist_ok=True)
        n = len(steps)
        index = len(self.episodes)
        start = sum(e["length"] for e in self.episodes)
        task = row["instruction"] or ""
        task_index = self.tasks.setdefault(task, len(self.tasks))
        state = np.asarray(steps.column("state").to_pylist(), np.float32)
        action, action_ok = filled_actions(steps.column("action").to_pylist(), row["action_space"],
                                           len(self.layout["action_layout"]))
        self.values["observation.state"].append(state)
        self.values["action"].append(action[action_ok])
        self.report.filled_actions += int((~action_ok).sum())
        self.report.held_views += int((~view_ok).any(axis=1).sum()) if view_ok.size else 0

        chunk, file = divmod(self.file_index, self.config.chunks_size)
        from_s = self.file_frames / self.fps
        entry = {
            "episode_index": index,
            "tasks": [task],
            "length": n,
            "data/chunk_index": chunk,
            "data/file_index": file,
            "dataset_from_index": start,
            "dataset_to_index": start + n,
        }
        for cam in self.layout["cameras"]:
            key = video_key(cam)
            if cam not in self.videos:
                h, w = self.layout["sizes"][cam]
                path = os.path.join(self.root, VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file))
                self.videos[cam] = VideoFile(path, w, h, self.fps, self.config.crf, self.config.gop)
            self.videos[cam].write(frames[cam])
            self._count_pixels(cam, frames[cam])
            entry.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                          f"videos/{key}/from_timestamp": from_s, f"videos/{key}/to_timestamp": from_s + n / self.fps})
        entry.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                      "gr2/episode_id": row["episode_id"], "gr2/source": row["source"],
                      "gr2/episode_key": row["episode_key"], "gr2/dataset": row["dataset"]})
        self.episodes.append(entry)

        frame_index = np.arange(n, dtype=np.int64)
        self.rows.append(pa.table({
            "observation.state": _vector(state),
            "action": _vector(action),
            "timestamp": pa.array((frame_index / self.fps).astype(np.float32)),
            "frame_index": pa.array(frame_index),
            "episode_index": pa.array(np.full(n, index, np.int64)),
            "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "task_index": pa.array(np.full(n, task_index, np.int64)),
            ACTION_OK: pa.array(action_ok),
            **({VIEW_OK: _vector(view_ok)} if view_ok.shape[1] else {}),
        }))
        self.file_frames += n
        self.report.episodes += 1
        self.report.frames += n
        if self._file_full():
            self._close_files()

    def _count_pixels(self, cam: str, frames: np.ndarray) -> None:
        hist = self.pixels.setdefault(cam, np.zeros((3, 256), np.int64))
        for c in range(3):
            hist[c] += np.bincount(frames[..., c].reshape(-1), minlength=256)

    def _file_full(self) -> bool:
        data_mb = sum(t.nbytes for t in self.rows) / 2**20
        sizes = [os.path.getsize(v.path) for v in self.videos.values() if os.path.exists(v.path)]
        video_mb = max(sizes, default=0) / 2**20
        return data_mb >= self.config.data_files_size_in_mb or video_mb >= self.config.video_files_size_in_mb

    def _close_files(self) -> None:
        import pyarrow.parquet as pq

        if not self.rows:
            return
        chunk, file = divmod(self.file_index, self.config.chunks_size)
        path = os.path.join(self.root, DATA_PATH.format(chunk_index=chunk, file_index=file))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.concat_tables(self.rows), path)
        for video in self.videos.values():
            video.close()
        self.rows, self.videos = [], {}
        self.file_index += 1
        self.file_frames = 0

    def close(self) -> DatasetReport:
        """Finish the open files and write meta/: info.json, tasks, episodes, stats."""
        import pandas as pd
        import pyarrow.parquet as pq

        self._close_files()
        if not self.episodes:
            return self.report
        meta = os.path.join(self.root, "meta")
        os.makedirs(os.path.join(meta, "episodes", "chunk-000"), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.episodes), os.path.join(self.root, EPISODES_PATH))
        # LeRobot reads tasks as a DataFrame indexed by the task's text (pandas keeps the index).
        tasks = sorted(self.tasks, key=self.tasks.get)
        pd.DataFrame({"task_index": [self.tasks[t] for t in tasks]}, index=pd.Index(tasks, name="task")).to_parquet(
            os.path.join(meta, "tasks.parquet"))
        with open(os.path.join(meta, "info.json"), "w") as f:
            json.dump(self._info(), f, indent=2)
        with open(os.path.join(meta, "stats.json"), "w") as f:
            json.dump(self._stats(), f, indent=2)
        return self.report

    def _info(self) -> dict:
        layout = self.layout
        features = {}
        for cam in layout["cameras"]:
            h, w = (int(v) for v in layout["sizes"][cam])
            features[video_key(cam)] = {
                "dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                "info": {"video.height": h, "video.width": w, "video.codec": "h264", "video.pix_fmt": "yuv420p",
                         "video.is_depth_map": False, "video.fps": self.fps, "video.channels": 3, "has_audio": False},
            }
        features.update({
            "observation.state": {"dtype": "float32", "shape": [len(layout["state_layout"])],
                                  "names": lay.names(layout["state_layout"]),
                                  lerobot.LAYOUT_KEY: lay.to_rows(layout["state_layout"])},
            "action": {"dtype": "float32", "shape": [len(layout["action_layout"])], "names": lay.names(layout["action_layout"]),
                       "gr2.action_space": layout["action_space"], lerobot.LAYOUT_KEY: lay.to_rows(layout["action_layout"])},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
            ACTION_OK: {"dtype": "bool", "shape": [1], "names": None},
        })
        if layout["cameras"]:
            features[VIEW_OK] = {"dtype": "bool", "shape": [len(layout["cameras"])], "names": list(layout["cameras"])}
        return {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": None,
            "total_episodes": len(self.episodes),
            "total_frames": self.report.frames,
            "total_tasks": len(self.tasks),
            "chunks_size": self.config.chunks_size,
            "data_files_size_in_mb": self.config.data_files_size_in_mb,
            "video_files_size_in_mb": self.config.video_files_size_in_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if layout["cameras"] else None,
            "features": features,
        }

    def _stats(self) -> dict:
        stats = {}
        for key, parts in self.values.items():
            values = np.concatenate(parts) if parts else np.zeros((0, 0))
            if len(values):
                stats[key] = _lerobot_stats(act.compute_stats(values, QUANTILES))
        lengths = [e["length"] for e in self.episodes]
        frame_index = np.concatenate([np.arange(n) for n in lengths])
        columns = {
            "timestamp": frame_index / self.fps,
            "frame_index": frame_index,
            "episode_index": np.repeat(np.arange(len(lengths)), lengths),
            "index": np.arange(self.report.frames),
            "task_index": np.repeat([self.tasks[e["tasks"][0]] for e in self.episodes], lengths),
        }
        for key, values in columns.items():
            stats[key] = _lerobot_stats(act.compute_stats(np.asarray(values, np.float64)[:, None], QUANTILES))
        for cam, hist in self.pixels.items():
            stats[video_key(cam)] = pixel_stats(hist)
        return stats


def video_key(camera: str) -> str:
    return f"observation.images.{camera}"


def _vector(values: np.ndarray) -> pa.Array:
    """[N, D] values as LeRobot's features declare them: a fixed-size list, or a scalar where D is 1."""
    values = np.ascontiguousarray(values)
    flat = pa.array(values.reshape(-1))
    return flat if values.shape[1] == 1 else pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _lerobot_stats(stats: dict) -> dict:
    """actions.compute_stats' output with LeRobot's shapes: `count` is a one-element list."""
    return {**stats, "count": [stats["count"]]}


def pixel_stats(hist: np.ndarray) -> dict:
    """Per-channel statistics in [0, 1], shaped [3, 1, 1] as LeRobot's image stats are, from 256-bin histograms."""
    levels = np.arange(256) / 255.0
    count = hist.sum(axis=1)
    mean = (hist * levels).sum(axis=1) / count
    std = np.sqrt(np.maximum((hist * levels**2).sum(axis=1) / count - mean**2, 0.0))
    cdf = np.cumsum(hist, axis=1) / count[:, None]
    out = {
        "min": [levels[np.flatnonzero(h)[0]] for h in hist],
        "max": [levels[np.flatnonzero(h)[-1]] for h in hist],
        "mean": mean.tolist(),
        "std": std.tolist(),
    }
    for q in QUANTILES:
        out[f"q{round(q * 100):02d}"] = [levels[int(np.searchsorted(c, q))] for c in cdf]
    shaped = {k: [[[float(v)]] for v in vals] for k, vals in out.items()}
    return {**shaped, "count": [int(count[0])]}


# -- the export -----------------------------------------------------------------------------------


def episode_frames(steps: pa.Table, cameras: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, str | None]:
    """({camera: [T, H, W, 3]}, [T, C] view ok, reason it cannot be exported or None)."""
    views = steps.column("views").to_pylist()
    ok = np.zeros((len(views), len(cameras)), bool)
    frames = {}
    for c, cam in enumerate(cameras):
        entries = [next((v for v in step if v["camera"] == cam), None) for step in views]
        if any(e is None for e in entries):
            return {}, ok, f"camera {cam} missing from the lake's views"
        ok[:, c] = [bool(e["ok"]) and e["jpeg"] is not None for e in entries]
        if not ok[:, c].any():
            return {}, ok, f"camera {cam} has no frame within tolerance at any step"
        source = nearest_ok(ok[:, c])
        decoded = {i: decode_jpeg(entries[i]["jpeg"]) for i in sorted(set(source.tolist()))}
        sizes = {d.shape for d in decoded.values()}
        if len(sizes) > 1:
            return {}, ok, f"camera {cam} frames change size within the episode ({sorted(sizes)})"
        frames[cam] = np.stack([decoded[i] for i in source])
    return frames, ok, None


def export_lerobot(lake, out: str, config: ExportConfig = ExportConfig()) -> ExportResult:
    """Write the lake's accepted episodes (those `config.where` selects) as LeRobot v3.0 datasets under `out`."""
    if "://" in out:
        raise ExportError(f"{out}: LeRobot datasets are local directories; export locally and upload")
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        raise ExportError(f"{out} is not empty; choose a new directory")
    episodes = select_episodes(lake, config.where).to_pylist()
    if not episodes:
        raise ExportError(f"no accepted episodes in {lake.root}" + (f" where {config.where}" if config.where else ""))

    skipped: list[str] = []
    by_rate: dict[int, list[dict]] = {}
    for row in episodes:
        rate = state_rate(row["state_fps"])
        if rate is None:
            skipped.append(f"{_name(row)}: {row['length']} step(s), no state rate")
        elif config.fps is not None and rate != config.fps:
            skipped.append(f"{_name(row)}: runs at {rate} Hz, not the {config.fps} Hz asked for")
        else:
            by_rate.setdefault(rate, []).append(row)
    if not by_rate:
        raise ExportError("no selected episode can be exported:\n" + "\n".join(skipped))

    reports = []
    bar = Progress(sum(len(rows) for rows in by_rate.values()), "export: episodes", "episode")
    for rate, rows in sorted(by_rate.items()):
        root = out if len(by_rate) == 1 else os.path.join(out, f"{rate}hz")
        writer = DatasetWriter(root, rate, config)
        try:
            for batch_start in range(0, len(rows), READ_BATCH):
                batch = rows[batch_start:batch_start + READ_BATCH]
                steps = lake.read("steps", filter=pc.field("episode_id").isin([r["episode_id"] for r in batch]))
                for row in batch:
                    reason = _export_episode(writer, row, steps)
                    if reason:
                        skipped.append(f"{_name(row)}: {reason}")
                    bar.update()
            report = writer.close()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)  # a half-written dataset would load as a wrong one
            bar.close()
            raise
        if report.episodes:
            reports.append(report)
    bar.close()
    if not reports:
        raise ExportError("no selected episode could be exported:\n" + "\n".join(skipped))
    return ExportResult(reports, skipped)


def _export_episode(writer: DatasetWriter, row: dict, steps: pa.Table) -> str | None:
    mine = steps.filter(pc.equal(steps["episode_id"], row["episode_id"])).sort_by("step")
    n = len(mine)
    if n == 0 or mine.column("step").to_pylist() != list(range(n)):
        return f"the lake holds {n} steps, not steps 0..{(row['length'] or 0) - 1}"
    error = clock_error_s(mine.column("timestamp_s").to_numpy(), writer.fps)
    if error > 0.25 / writer.fps:
        return f"state clock strays {error * 1000:.1f} ms from the {writer.fps} Hz grid (more than a quarter period)"
    reason = writer.check(row, mine)
    if reason:
        return reason
    cameras = writer.layout["cameras"] if writer.layout else (list(writer.config.cameras) or list(row["cameras"] or []))
    frames, view_ok, reason = episode_frames(mine, cameras)
    if reason:
        return reason
    if writer.layout:
        sizes = {c: frames[c].shape[1:3] for c in cameras}
        wrong = [c for c in cameras if tuple(sizes[c]) != tuple(writer.layout["sizes"][c])]
        if wrong:
            return f"camera {wrong[0]} frames are {sizes[wrong[0]]}, the dataset's {writer.layout['sizes'][wrong[0]]}"
    writer.add(row, mine, frames, view_ok)
    writer.report.max_clock_error_s = max(writer.report.max_clock_error_s, error)
    return None


def _name(row: dict) -> str:
    return f"{row['source']}#{row['episode_key']}"
