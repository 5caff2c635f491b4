"""JSON-annotated episodes: one JSON per episode naming its instruction, its videos (one per view),
its states and its actions, as in the RT-1, Bridge and xhand samples of video-prediction-policy:

    <root>/annotation/<split>/<id>.json   {"texts": [instruction], "videos": [{"video_path": ...}],
                                           "state" | "states": [N, S], "action" | "actions": [N-1 or N, A],
                                           "continuous_gripper_state": [N] (optional)}
    <root>/videos/<split>/<id>/*.mp4      paths in the JSON are relative to <root>

States are one per video frame; the state clock is frame_index / the first view's rate and each
view keeps its own presentation times. Views in the episode's video folder that the JSON does not
list are read too: the xhand sample lists two of the three views it recorded.

End-effector layouts, recognised by the state's width:
    7:  x, y, z, roll, pitch, yaw (extrinsic xyz), gripper (RT-1, Bridge); the gripper command is
        `continuous_gripper_state` when present (the state's own gripper column is constant there)
    19: x, y, z, quaternion (w, x, y, z), 12 hand joints (xhand); the "effector" is the hand
The command at step t is the effector value at t+1: where the step leads to.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from gr2.robot import layout as lay
from gr2.robot.actions import quat_from_euler, quat_from_wxyz
from gr2.robot.episode import (
    Camera,
    EndEffector,
    Episode,
    EpisodeError,
    EpisodeRef,
    VideoFrames,
    check_shape,
    dataset_path,
    video_timestamps,
)
from gr2.video.probe import OPEN_OPTIONS

FORMAT = "annotated-json"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")

# The declared layouts, by the state's width. RT-1's and Bridge's gripper is an opening in [0, 1]
# (Bridge's sample holds 0.92): continuous, never a sign. Their actions are per-step pose deltas.
OPENING = lay.continuous_gripper(low=0.0, high=1.0)
HAND = lay.dims(" ".join(f"hand_{i}" for i in range(12)), "rad")  # xhand's twelve joint targets
LAYOUTS = {
    7: (lay.dims("x y z", "m") + lay.dims("roll pitch yaw", "rad") + (OPENING,),
        lay.dims("dx dy dz", "m", "delta") + lay.dims("droll dpitch dyaw", "rad", "delta") + (OPENING,),
        (OPENING,)),
    19: (lay.dims("x y z", "m") + lay.dims("qw qx qy qz", "1") + HAND,
         lay.dims("x y z", "m") + lay.dims("qw qx qy qz", "1") + HAND,  # absolute targets, as the state
         HAND),
}


def is_dataset(path: str) -> bool:
    return bool(_annotation_files(path))


def _annotation_files(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "annotation", "**", "*.json"), recursive=True))


def list_episodes(root: str, dataset: str | None = None) -> list[EpisodeRef]:
    name = dataset or os.path.basename(os.path.normpath(root))
    refs = []
    views: set[str] = set()
    for path in _annotation_files(root):
        key = os.path.splitext(os.path.relpath(path, os.path.join(root, "annotation")))[0]
        views.update(_view_names(root, _read(path, f"{root}#{key}")))
        refs.append(key)
    return [EpisodeRef(FORMAT, root, key, tuple(sorted(views)), name) for key in refs]



def index_files(files: list[str]) -> list[str]:
    """Of a source's files (relative to its root), those `list_episodes` reads: the annotations."""
    return [f for f in files if f.startswith("annotation/") and f.endswith(".json")]


def episode_files(ref: EpisodeRef, files: list[str]) -> list[str]:
    """Of a source's files, those `load_episode(ref)` reads: its annotation and its views' videos."""
    annotation = f"annotation/{ref.key}.json"
    ann = _read(os.path.join(ref.source, annotation), ref.uri)
    listed = [os.path.normpath(v["video_path"]) for v in ann.get("videos", []) if v.get("video_path")]
    folders = {os.path.dirname(p) for p in listed}
    views = [f for f in files if f in listed or (os.path.dirname(f) in folders and f.lower().endswith(VIDEO_EXTENSIONS))]
    return [annotation, *views]


def _read(path: str, uri: str) -> dict:
    try:
        with open(path) as f:
            ann = json.load(f)
    except (OSError, ValueError) as e:
        raise EpisodeError(f"{uri}: cannot read annotation {path} ({e})") from None
    if not isinstance(ann, dict) or not isinstance(ann.get("videos", []), list) \
            or not all(isinstance(v, dict) for v in ann.get("videos", [])):
        raise EpisodeError(f"{uri}: annotation {path} is not an object whose videos are a list of objects")
    return ann


def _view_paths(root: str, ann: dict, where: str | None = None) -> list[str]:
    """The episode's videos; a video_path outside the dataset is EpisodeError when loading the episode
    (`where`: its uri), and left out of the listing's camera names."""
    listed = []
    for v in ann.get("videos", []):
        if v.get("video_path"):
            try:
                listed.append(dataset_path(where or root, root, v["video_path"], "the annotation's video_path"))
            except EpisodeError:
                if where is not None:
                    raise
    found = list(listed)
    for folder in dict.fromkeys(os.path.dirname(p) for p in listed):
        for path in sorted(glob.glob(os.path.join(folder, "*"))):
            if path.lower().endswith(VIDEO_EXTENSIONS) and path not in found:
                found.append(path)
    return found


def _view_names(root: str, ann: dict) -> list[str]:
    return [os.path.splitext(os.path.basename(p))[0] for p in _view_paths(root, ann)]


def load_episode(ref: EpisodeRef) -> Episode:
    try:
        return _load_episode(ref)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # the annotation is JSON anyone may write: a field of the wrong kind ends here, named
        raise EpisodeError(f"{ref.uri}: annotation has a field of the wrong kind ({type(e).__name__}: {e})") from None


def _load_episode(ref: EpisodeRef) -> Episode:
    ann = _read(os.path.join(ref.source, "annotation", ref.key + ".json"), ref.uri)
    state = _array(ann, ("states", "state"), ref)
    action = _array(ann, ("actions", "action"), ref)
    texts = ann.get("texts") or []
    cameras = {}
    for path in _view_paths(ref.source, ann, ref.uri):
        name = os.path.splitext(os.path.basename(path))[0]
        if not os.path.exists(path):
            continue  # Episode.validate names the missing camera
        try:
            frames = VideoFrames(path)
            times = video_timestamps(path)
            fps = _fps(path)
        except Exception as e:  # DecodeError, or PyAV's own errors on a broken container
            raise EpisodeError(f"{ref.uri}: camera {name}: unreadable video {path} ({type(e).__name__}: {e})") from None
        if len(times) != len(frames):
            times = np.arange(len(frames)) / fps
        cameras[name] = Camera(name, times, frames, fps)
    fps = next(iter(cameras.values())).fps if cameras else 1.0
    t = np.arange(len(state)) / fps
    state_layout, action_layout, _ = LAYOUTS.get(state.shape[1], (None, None, None))
    return Episode(ref, texts[0] if texts else None, t, state, action, cameras, _end_effector(ann, state),
                   meta={"source_episode_id": str(ann.get("episode_id", ""))},
                   state_layout=state_layout or lay.unknown(state.shape[1], "state"),
                   action_layout=lay.or_unknown(action_layout or (), action.shape[1], "action"))


def _array(ann: dict, keys: tuple[str, ...], ref: EpisodeRef) -> np.ndarray:
    for key in keys:
        if key in ann:
            try:
                a = np.asarray(ann[key], dtype=np.float64)
            except (ValueError, TypeError) as e:
                raise EpisodeError(f"{ref.uri}: {key} is not a numeric [steps, dims] array ({e})") from None
            check_shape(ref.uri, key, a.shape)
            return a.reshape(len(a), -1)
    raise EpisodeError(f"{ref.uri}: annotation has none of {list(keys)}")


def _fps(path: str) -> float:
    import av

    with av.open(path, options=OPEN_OPTIONS) as c:
        rate = c.streams.video[0].average_rate or c.streams.video[0].guessed_rate
        return float(rate) if rate else 1.0


def _end_effector(ann: dict, state: np.ndarray) -> EndEffector | None:
    if state.shape[1] == 7:
        quat = quat_from_euler(state[:, 3:6], "xyz")
        grip = np.asarray(ann["continuous_gripper_state"], np.float64).reshape(-1, 1) if "continuous_gripper_state" in ann else state[:, 6:7]
        if len(grip) != len(state):
            return None  # Episode.validate reports the length mismatch on the state and action
    elif state.shape[1] == 19:
        quat = quat_from_wxyz(state[:, 3:7])
        grip = state[:, 7:]
    else:
        return None
    effector = np.concatenate([grip[1:], grip[-1:]], axis=0)  # where step t leads: the value at t+1
    return EndEffector(state[:, :3], quat, effector, LAYOUTS[state.shape[1]][2])
