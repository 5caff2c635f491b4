"""HDF5 episode files in the robomimic layout and the ALOHA layout.

robomimic (many episodes per file):
    data/                 attrs: env_args (JSON; env_kwargs.control_freq, default 20 Hz)
    data/demo_N/actions   [T, A]   (OSC: dpos 3, drot 3 axis-angle, gripper)
    data/demo_N/obs/<cam>_image [T, H, W, 3] uint8
    data/demo_N/obs/robot0_eef_pos [T, 3], robot0_eef_quat [T, 4] (x, y, z, w), robot0_gripper_qpos ...
    instruction: demo attrs lang | instruction | language_instruction, or data attrs problem_info
    (LIBERO's JSON with language_instruction)

ALOHA (one episode per file, 50 Hz, joint space, so actions stay native):
    /action [T, 14], /observations/qpos [T, 14], /observations/images/<cam> [T, H, W, 3]
    compressed variant (file attr compress=True): each image row is padded JPEG bytes

Cameras of both are synchronous with the state, so their timestamps are the state's. Frames stay
in the file and are read on demand.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from gr2.robot import layout as lay
from gr2.robot.episode import ArrayFrames, Camera, EndEffector, Episode, EpisodeError, EpisodeRef, check_shape

ROBOMIMIC = "hdf5-robomimic"
ALOHA = "hdf5-aloha"
ALOHA_FPS = 50.0
ROBOMIMIC_FPS = 20.0
STATE_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
# robomimic's OSC actions are scaled to [-1, 1] (unitless deltas); its gripper is -1 open, 1 closed.
ROBOMIMIC_STATE = (lay.dims("x y z", "m") + lay.dims("qx qy qz qw", "1")
                   + (lay.continuous_gripper("finger_left", unit="m"), lay.continuous_gripper("finger_right", unit="m")))
ROBOMIMIC_ACTION = lay.dims("dx dy dz", "1", "delta") + lay.dims("rx ry rz", "1", "delta") + (lay.binary_gripper(),)
# ALOHA: per arm six joint angles and a gripper opening, as state and as absolute joint targets.
ALOHA_LAYOUT = tuple(d for side in ("left", "right") for d in (
    *lay.dims(" ".join(f"{side}_{j}" for j in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle",
                                                "wrist_rotate")), "rad"),
    lay.continuous_gripper(f"{side}_gripper")))


def _files(source: str) -> list[str]:
    if os.path.isfile(source):
        return [source]
    found = glob.glob(os.path.join(source, "**", "*.hdf5"), recursive=True)
    found += glob.glob(os.path.join(source, "**", "*.h5"), recursive=True)
    return sorted(found)


def is_dataset(path: str) -> bool:
    return bool(_files(path)) and (os.path.isfile(path) or not os.path.isfile(os.path.join(path, "meta", "info.json")))


def _open(path: str, ref_uri: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise EpisodeError(f"{ref_uri}: cannot open HDF5 file {path} ({e})") from None


def _demos(f) -> list[str]:
    return sorted((k for k in f["data"].keys() if k.startswith("demo")), key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else k)


def layout(f) -> str | None:
    if "data" in f and any(k.startswith("demo") for k in f["data"].keys()):
        return ROBOMIMIC
    if "observations" in f and "action" in f:
        return ALOHA
    return None


def list_episodes(source: str, dataset: str | None = None) -> list[EpisodeRef]:
    """Every episode in the file or the directory of files `source`."""
    name = dataset or os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    refs, cams_by_format = [], {ROBOMIMIC: set(), ALOHA: set()}
    for path in _files(source):
        rel = os.path.relpath(path, source) if os.path.isdir(source) else os.path.basename(path)
        with _open(path, path) as f:
            kind = layout(f)
            if kind == ROBOMIMIC:
                for demo in _demos(f):
                    cams_by_format[kind].update(_robomimic_cameras(f["data"][demo]))
                    refs.append((kind, f"{rel}:{demo}"))
            elif kind == ALOHA:
                cams_by_format[kind].update(f["observations/images"].keys() if "observations/images" in f else [])
                refs.append((kind, rel))
            else:
                raise EpisodeError(f"{path}: neither robomimic (data/demo_N) nor ALOHA (/observations, /action) layout")
    # Every episode promises the cameras any episode of its source has: one that lacks one fails.
    return [EpisodeRef(kind, source, key, tuple(sorted(cams_by_format[kind])), name) for kind, key in refs]



def index_files(files: list[str]) -> list[str]:
    """Of a directory source's files, those `list_episodes` reads: every HDF5 file (it opens them all)."""
    return [f for f in files if f.endswith((".hdf5", ".h5"))]


def episode_files(ref: EpisodeRef, files: list[str]) -> list[str]:
    """Of a directory source's files, the one `load_episode(ref)` reads."""
    return [ref.key.partition(":")[0]]


def _robomimic_cameras(demo) -> list[str]:
    return [k[: -len("_image")] for k in demo["obs"].keys() if k.endswith("_image")] if "obs" in demo else []


def _path(ref: EpisodeRef) -> tuple[str, str]:
    rel, _, demo = ref.key.partition(":")
    return (ref.source if os.path.isfile(ref.source) else os.path.join(ref.source, rel)), demo


def load_episode(ref: EpisodeRef) -> Episode:
    path, demo = _path(ref)
    f = _open(path, ref.uri)  # stays open while the frames are read; closed when the episode goes
    try:
        if ref.format == ROBOMIMIC:
            return _robomimic(ref, f, demo)
        return _aloha(ref, f)
    except KeyError as e:
        f.close()
        raise EpisodeError(f"{ref.uri}: missing dataset {e} in {path}") from None


def _robomimic(ref: EpisodeRef, f, demo: str) -> Episode:
    data = f["data"]
    if demo not in data:
        raise EpisodeError(f"{ref.uri}: no group data/{demo}")
    g = data[demo]
    obs = g["obs"]
    fps = _control_freq(data.attrs.get("env_args"))
    actions = _array(ref, g, "actions")
    low_dim = [k for k in STATE_KEYS if k in obs] or sorted(k for k in obs.keys() if not k.endswith("_image"))
    parts = [_array(ref, obs, k) for k in low_dim]
    if not parts or len({len(p) for p in parts}) > 1:
        raise EpisodeError(f"{ref.uri}: length mismatch: low-dim observations {low_dim} have "
                           f"{[len(p) for p in parts]} steps")
    state = np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)
    t = np.arange(len(state)) / fps
    action_layout = lay.or_unknown(ROBOMIMIC_ACTION, actions.shape[1], "action")
    ee = None
    if "robot0_eef_pos" in obs and "robot0_eef_quat" in obs:
        has_gripper = actions.shape[1] >= 7 and len(actions) == len(state)
        effector = actions[:, -1:] if has_gripper else np.zeros((len(state), 0))
        ee = EndEffector(_array(ref, obs, "robot0_eef_pos"), _array(ref, obs, "robot0_eef_quat"),
                         effector, action_layout[-1:] if has_gripper else ())
    cameras = {}
    for name in _robomimic_cameras(g):
        frames = _frames(ref, obs, f"{name}_image", len(state))
        cameras[name] = Camera(name, np.arange(len(frames)) / fps, ArrayFrames(frames), fps)
    state_layout = ROBOMIMIC_STATE if tuple(low_dim) == STATE_KEYS else ()
    return Episode(ref, _robomimic_instruction(data, g), t, state, actions, cameras, ee,
                   meta={"low_dim_keys": low_dim, "_file": f},
                   state_layout=lay.or_unknown(state_layout, state.shape[1], "state"), action_layout=action_layout)


def _control_freq(env_args) -> float:
    try:
        args = json.loads(env_args) if isinstance(env_args, (str, bytes)) else {}
        return float(args.get("env_kwargs", {}).get("control_freq") or ROBOMIMIC_FPS)
    except (ValueError, TypeError, AttributeError):
        return ROBOMIMIC_FPS


def _robomimic_instruction(data, demo) -> str | None:
    for key in ("lang", "instruction", "language_instruction"):
        if key in demo.attrs:
            return _text(demo.attrs[key])
    info = data.attrs.get("problem_info")
    if info is not None:
        try:
            return _text(json.loads(_text(info)).get("language_instruction"))
        except (ValueError, AttributeError):
            return None
    return None


def _aloha(ref: EpisodeRef, f) -> Episode:
    state = _array(ref, f, "observations/qpos")
    action = _array(ref, f, "action")
    fps = _attr(ref, f, "fps", float, ALOHA_FPS)
    t = np.arange(len(state)) / fps
    compressed = _attr(ref, f, "compress", bool, False)
    cameras = {}
    images = f["observations/images"] if "observations/images" in f else {}
    for name in images.keys():
        frames = _frames(ref, images, name, len(state))
        cameras[name] = Camera(name, np.arange(len(frames)) / fps, ArrayFrames(frames, decode_jpeg=compressed), fps)
    instruction = _text(f.attrs["instruction"]) if "instruction" in f.attrs else None
    return Episode(ref, instruction, t, state, action, cameras, None, meta={"_file": f},
                   state_layout=lay.or_unknown(ALOHA_LAYOUT, state.shape[1], "state"),
                   action_layout=lay.or_unknown(ALOHA_LAYOUT, action.shape[1], "action"))


def _array(ref: EpisodeRef, group, key: str) -> np.ndarray:
    """A numeric dataset as float64; its declared shape is checked before a byte of it is read."""
    import h5py

    ds = group[key]
    if not isinstance(ds, h5py.Dataset):
        raise EpisodeError(f"{ref.uri}: {group.name}/{key} is a group, not a dataset")
    check_shape(ref.uri, ds.name, ds.shape)
    try:
        return np.asarray(ds, np.float64)
    except (TypeError, ValueError, OSError) as e:  # strings or compound types; a truncated file's missing chunks
        raise EpisodeError(f"{ref.uri}: {ds.name} is not a readable numeric array ({ds.dtype}: {e})") from None


def _frames(ref: EpisodeRef, group, key: str, steps: int):
    """A camera's frame dataset, left unread: one frame per step in both layouts, so never more frames than steps."""
    import h5py

    ds = group[key]
    # uint8 in both layouts (pixels, or ALOHA's JPEG bytes): floats would be cast to pixels silently, NaN and all.
    if not isinstance(ds, h5py.Dataset) or ds.dtype != np.uint8 or ds.ndim not in (2, 4):
        raise EpisodeError(f"{ref.uri}: camera {ds.name} is not uint8 [frames, H, W, 3] pixels or [frames, bytes] "
                           f"(shape {getattr(ds, 'shape', None)}, dtype {getattr(ds, 'dtype', None)})")
    if len(ds) > steps:
        raise EpisodeError(f"{ref.uri}: length mismatch: camera {ds.name} has {len(ds)} frames for {steps} steps")
    return ds


def _attr(ref: EpisodeRef, f, name: str, kind, default):
    try:
        return kind(f.attrs.get(name, default))
    except (TypeError, ValueError) as e:
        raise EpisodeError(f"{ref.uri}: attribute {name!r} is not a {kind.__name__} ({e})") from None


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return _text(value.reshape(-1)[0]) if value.size else None
    return str(value)
