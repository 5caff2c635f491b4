"""LeRobot dataset directories, v2.x (one parquet and one mp4 per camera per episode) and v3.0
(many episodes per parquet and per mp4, located through meta/episodes/).

Camera clocks: LeRobot assumes every camera runs at the dataset's fps in step with the state.
A dataset that knows better (ours, from record_metaworld) names per-camera frame timestamps in
info.json's `camera_timestamps_path`; otherwise each frame's time is its presentation time in
the mp4 (minus the episode's `from_timestamp` in v3), which is what LeRobot itself decodes by.
A camera's feature info may declare its latency (`gr2.latency_s`), used unless the config overrides.
A dataset gr2 exported marks the steps whose view had no frame in the lake (`gr2.view_ok`): those
frames only stand in, so they are left out and the step is flagged again when aligned.

The end effector: when `observation.state`'s names include a position (x, y, z) and a rotation
(qx, qy, qz, qw, or roll, pitch, yaw), the episode carries an EndEffector and gets ee_delta
actions; the effector command is the action's `gripper` dimension, else the state's.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa

from gr2.robot import layout as lay
from gr2.robot.actions import quat_from_euler
from gr2.robot.episode import (
    Camera,
    EncodedFrames,
    EndEffector,
    Episode,
    EpisodeError,
    EpisodeRef,
    SelectedFrames,
    VideoFrames,
    check_shape,
    dataset_path,
    video_timestamps,
)

FORMAT = "lerobot"
STATE_KEY = "observation.state"
LAYOUT_KEY = "gr2_layout"  # beside a feature's names in meta/info.json: its declared layout (layout.py)
ACTION_KEY = "action"
# Not a LeRobot key: a camera's calibrated latency (s), which a rig that knows it may declare.
LATENCY_KEY = "gr2.latency_s"
# Not a LeRobot key: per step, whether each camera's frame is its own (robot/export.py writes it).
VIEW_OK_KEY = "gr2.view_ok"


def is_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta", "info.json"))


def read_info(root: str) -> dict:
    try:
        with open(os.path.join(root, "meta", "info.json")) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise EpisodeError(f"{root}: cannot read meta/info.json ({e})") from None
    features = info.get("features", {}) if isinstance(info, dict) else None
    if not isinstance(features, dict) or not all(isinstance(f, dict) for f in features.values()):
        raise EpisodeError(f"{root}: meta/info.json is not an object whose features are objects")
    return info


def _version(info: dict) -> int:
    return 3 if str(info.get("codebase_version", "v2")).lstrip("v").startswith("3") else 2


def camera_keys(info: dict) -> list[str]:
    return [k for k, f in info.get("features", {}).items() if f.get("dtype") in ("video", "image")]


def camera_name(key: str) -> str:
    """observation.images.corner -> corner."""
    return key.split(".")[-1]


def list_episodes(root: str, dataset: str | None = None) -> list[EpisodeRef]:
    """Every episode of the dataset at `root`."""
    info = read_info(root)
    cams = tuple(camera_name(k) for k in camera_keys(info))
    name = dataset or os.path.basename(os.path.normpath(root))
    where = "meta/episodes" if _version(info) == 3 else "meta/episodes.jsonl"
    try:
        if _version(info) == 3:
            indices = sorted(int(i) for i in _v3_episodes(root)["episode_index"])
        else:
            indices = [int(e["episode_index"]) for e in _jsonl(os.path.join(root, "meta", "episodes.jsonl"))]
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # NaN, text, null or no episode_index
        raise EpisodeError(f"{root}: {where} has an episode without an integer episode_index "
                           f"({type(e).__name__}: {e})") from None
    return [EpisodeRef(FORMAT, root, f"episode_{i:06d}", cams, name) for i in indices]


def load_episode(ref: EpisodeRef) -> Episode:
    """The episode `ref` names, with its camera streams opened (frames decode on demand)."""
    try:
        return _load_episode(ref)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        # meta/ is JSON and parquet anyone may write: a template that does not fill, a feature, a number
        # or a column of the wrong kind all end here, named, instead of as a bare Python error.
        raise EpisodeError(f"{ref.uri}: meta/info.json, meta/episodes or the episode's parquet has a field "
                           f"of the wrong kind ({type(e).__name__}: {e})") from None


def _load_episode(ref: EpisodeRef) -> Episode:
    import pyarrow.parquet as pq

    root, info = ref.source, read_info(ref.source)
    index = int(ref.key.rsplit("_", 1)[-1])
    version = _version(info)
    meta = _v3_episode_row(root, index) if version == 3 else None
    path = dataset_path(ref.uri, root, _data_path(info, index, meta), "meta/info.json's data_path")
    if version == 3:
        table = _read_parquet(pq, path, ref)
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["episode_index"], index))
        instruction = _first(meta.get("tasks"))
    else:
        table = _read_parquet(pq, path, ref)
        instruction = _v2_task(root, table)
    if len(table) == 0:
        raise EpisodeError(f"{ref.uri}: no rows in {path}")

    columns = table.column_names
    for needed in (STATE_KEY, ACTION_KEY, "timestamp"):
        if needed not in columns:
            raise EpisodeError(f"{ref.uri}: {path} has no column {needed!r}")
    if "frame_index" in columns:
        table = table.sort_by("frame_index")
    state = _matrix(table, STATE_KEY, ref)
    action = _matrix(table, ACTION_KEY, ref)
    if not pa.types.is_integer(table.schema.field("timestamp").type) and \
            not pa.types.is_floating(table.schema.field("timestamp").type):
        raise EpisodeError(f"{ref.uri}: column timestamp is {table.schema.field('timestamp').type}, "
                           "not one number per step")
    timestamps = np.asarray(table.column("timestamp").to_numpy(zero_copy_only=False), np.float64).reshape(-1)

    cameras = {}
    for key in camera_keys(info):
        cam = _camera(ref, root, info, key, index, version, meta, table)
        if cam is not None:
            cameras[cam.name] = cam
    return Episode(
        ref=ref,
        instruction=instruction,
        timestamps_s=timestamps,
        state=state,
        action=action,
        cameras=cameras,
        end_effector=end_effector(info, state, action),
        meta={"codebase_version": info.get("codebase_version"), "robot_type": info.get("robot_type")},
        state_layout=feature_layout(info, STATE_KEY, state.shape[1]),
        action_layout=feature_layout(info, ACTION_KEY, action.shape[1]),
    )


def _camera(ref, root, info, key, index, version, meta, table) -> Camera | None:
    feature = info["features"][key]
    fps = float(feature.get("info", {}).get("video.fps") or info.get("fps") or 0) or None
    latency = feature.get("info", {}).get(LATENCY_KEY)
    name = camera_name(key)
    if feature.get("dtype") == "image":  # frames stored in the parquet as encoded images
        if key not in table.column_names:
            return None
        encoded = [row["bytes"] if isinstance(row, dict) else row for row in table.column(key).to_pylist()]
        frames = EncodedFrames(encoded)
        return Camera(name, np.asarray(table.column("timestamp").to_numpy(zero_copy_only=False), np.float64), frames, fps)
    path = dataset_path(ref.uri, root, _video_path(info, key, index, meta), "meta/info.json's video_path")
    if not os.path.exists(path):
        return None  # Episode.validate names the missing camera
    try:
        if version == 3:
            start, end = float(meta[f"videos/{key}/from_timestamp"]), float(meta[f"videos/{key}/to_timestamp"])
            pts = video_timestamps(path)
            # A frame belongs to the episode when its time falls in [from, to); half a frame of slack
            # absorbs the container's rounding of presentation times.
            slack = 0.5 / fps if fps else 1e-3
            inside = np.flatnonzero((pts >= start - slack) & (pts < end - slack))
            if len(inside) == 0:
                raise EpisodeError(f"{ref.uri}: camera {name}: no frames in [{start}, {end}) of {path}")
            frames = VideoFrames(path, first=int(inside[0]), count=len(inside))
            times = pts[inside] - start
        else:
            frames = VideoFrames(path)
            times = _v2_camera_times(root, info, key, index, path, len(frames), fps)
    except EpisodeError:
        raise
    except Exception as e:  # DecodeError, or PyAV's own errors on a broken container
        raise EpisodeError(f"{ref.uri}: camera {name}: unreadable video {path} ({type(e).__name__}: {e})") from None
    own = _own_frames(info, name, table, len(times))
    if own is not None:
        frames, times = SelectedFrames(frames, np.flatnonzero(own)), times[own]
    return Camera(name, times, frames, fps, None if latency is None else float(latency))


def _own_frames(info: dict, camera: str, table, count: int) -> np.ndarray | None:
    """Which of a camera's frames are its own, where the dataset marks stand-ins (VIEW_OK_KEY), else None."""
    names = info.get("features", {}).get(VIEW_OK_KEY, {}).get("names") or []
    if VIEW_OK_KEY not in table.column_names or camera not in names or len(table) != count:
        return None
    return np.asarray(table.column(VIEW_OK_KEY).to_pylist(), bool).reshape(count, -1)[:, names.index(camera)]


def _v2_camera_times(root, info, key, index, video_path, count, fps) -> np.ndarray:
    template = info.get("camera_timestamps_path")
    if template:
        import pyarrow.parquet as pq

        path = dataset_path(root, root, _times_path(info, key, index), "meta/info.json's camera_timestamps_path")
        t = pq.read_table(path).sort_by("frame_index")
        return np.asarray(t.column("timestamp").to_numpy(), np.float64)
    pts = video_timestamps(video_path)
    if len(pts) == count:
        return pts
    return np.arange(count) / fps  # a container whose packets carry no usable times


def _chunk(info: dict, index: int) -> int:
    return index // info.get("chunks_size", 1000)


def _data_path(info: dict, index: int, meta: dict | None) -> str:
    """The episode's parquet, relative to the root (`meta`: its v3 meta/episodes row)."""
    if meta is not None:
        return info["data_path"].format(chunk_index=int(meta["data/chunk_index"]), file_index=int(meta["data/file_index"]))
    return info["data_path"].format(episode_chunk=_chunk(info, index), episode_index=index)


def _video_path(info: dict, key: str, index: int, meta: dict | None) -> str:
    if meta is not None:
        return info["video_path"].format(video_key=key, chunk_index=int(meta[f"videos/{key}/chunk_index"]),
                                         file_index=int(meta[f"videos/{key}/file_index"]))
    return info["video_path"].format(video_key=key, episode_chunk=_chunk(info, index), episode_index=index)


def _times_path(info: dict, key: str, index: int) -> str:
    return info["camera_timestamps_path"].format(episode_chunk=_chunk(info, index), episode_index=index, video_key=key)


def index_files(files: list[str]) -> list[str]:
    """Of a source's files (relative to its root), those `list_episodes` reads: meta/."""
    return [f for f in files if f.startswith("meta/")]


def episode_files(ref: EpisodeRef, files: list[str]) -> list[str]:
    """Of a source's files, those `load_episode(ref)` reads; meta/ must be readable under ref.source."""
    info = read_info(ref.source)
    index = int(ref.key.rsplit("_", 1)[-1])
    meta = _v3_episode_row(ref.source, index) if _version(info) == 3 else None
    wanted = set()

    def want(path_of) -> None:
        try:
            wanted.add(path_of())
        except (KeyError, ValueError, IndexError, TypeError):
            pass  # a broken path template: load_episode reports it, as it does from disk

    want(lambda: _data_path(info, index, meta))
    for key in camera_keys(info):
        if info["features"][key].get("dtype") == "video":
            want(lambda: _video_path(info, key, index, meta))
            if info.get("camera_timestamps_path") and meta is None:
                want(lambda: _times_path(info, key, index))
    # a file the listing lacks is left for load_episode to report, as it does from disk
    listed = set(files)
    return index_files(files) + sorted(f for f in wanted if f in listed)


def end_effector(info: dict, state: np.ndarray, action: np.ndarray) -> EndEffector | None:
    """The end-effector pose named by the state's feature names, if they name one."""
    names = feature_names(info, STATE_KEY)
    if not names or not all(n in names for n in ("x", "y", "z")):
        return None
    pos = state[:, [names.index(n) for n in ("x", "y", "z")]]
    if all(n in names for n in ("qx", "qy", "qz", "qw")):
        quat = state[:, [names.index(n) for n in ("qx", "qy", "qz", "qw")]]
    elif all(n in names for n in ("roll", "pitch", "yaw")):
        quat = quat_from_euler(state[:, [names.index(n) for n in ("roll", "pitch", "yaw")]], "xyz")
    else:
        return None
    action_names = feature_names(info, ACTION_KEY)
    if action_names and "gripper" in action_names and len(action) == len(state):
        i = action_names.index("gripper")
        effector, layout = action[:, [i]], feature_layout(info, ACTION_KEY, action.shape[1])[i:i + 1]
    elif "gripper" in names:
        i = names.index("gripper")
        effector, layout = state[:, [i]], feature_layout(info, STATE_KEY, state.shape[1])[i:i + 1]
    else:
        effector, layout = np.zeros((len(state), 0)), ()
    return EndEffector(pos=pos, quat=quat, effector=effector, layout=layout)


def feature_layout(info: dict, key: str, width: int) -> lay.Layout:
    """A vector feature's layout: as declared under the feature's `gr2_layout` (our recordings and
    exports write it), else from its names, where a dimension named like a gripper is taken for a
    continuous one: regressed, the reading that never turns a half-open gripper into a closed one."""
    declared = info.get("features", {}).get(key, {}).get(LAYOUT_KEY)
    if declared:
        layout = lay.from_rows(declared)
        lay.check(layout, width, f"{key} in meta/info.json")
        return layout
    names = feature_names(info, key)
    if not names or len(names) != width:
        return lay.unknown(width, key.rsplit(".", 1)[-1])
    return tuple(lay.continuous_gripper(n) if "gripper" in n.lower() else lay.Dim(n) for n in names)


def feature_names(info: dict, key: str) -> list[str] | None:
    """The names of a vector feature's dimensions, when info.json gives them."""
    names = info.get("features", {}).get(key, {}).get("names")
    if isinstance(names, dict):  # LeRobot also writes {"motors": [...]} or {"axes": [...]}
        names = next(iter(names.values()), None)
    return [str(n) for n in names] if isinstance(names, list) else None


def _matrix(table, column: str, ref: EpisodeRef) -> np.ndarray:
    values = table.column(column).to_pylist()
    try:
        matrix = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    except (ValueError, TypeError) as e:
        raise EpisodeError(f"{ref.uri}: column {column} is not a [steps, dims] array ({e})") from None
    check_shape(ref.uri, f"column {column}", matrix.shape)
    return matrix


def _read_parquet(pq, path: str, ref: EpisodeRef):
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as e:
        raise EpisodeError(f"{ref.uri}: cannot read {path} ({e})") from None


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _v2_task(root: str, table) -> str | None:
    if "task_index" not in table.column_names:
        return None
    path = os.path.join(root, "meta", "tasks.jsonl")
    if not os.path.exists(path):
        return None
    tasks = {int(t["task_index"]): t["task"] for t in _jsonl(path)}
    return tasks.get(int(table.column("task_index")[0].as_py()))


def _v3_episodes(root: str):
    import pyarrow.dataset as pads

    return pads.dataset(os.path.join(root, "meta", "episodes"), format="parquet").to_table().to_pydict()


def _v3_episode_row(root: str, index: int) -> dict:
    table = _v3_episodes(root)
    rows = [i for i, e in enumerate(table["episode_index"]) if int(e) == index]
    if not rows:
        raise EpisodeError(f"{root}: episode {index} not in meta/episodes")
    return {k: v[rows[0]] for k, v in table.items()}


def _first(tasks) -> str | None:
    if isinstance(tasks, (list, tuple)) and tasks:
        return str(tasks[0])
    return str(tasks) if tasks else None
