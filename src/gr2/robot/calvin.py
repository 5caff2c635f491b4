"""CALVIN episode folders: one episode_XXXXXXX.npz per 30 Hz step.

    <split>/episode_0000000.npz   actions (7, absolute), rel_actions (7), robot_obs (15),
                                  rgb_static [200, 200, 3], rgb_gripper [84, 84, 3], ...
    <split>/ep_start_end_ids.npy  [[first, last], ...] recorded runs, both ends inclusive
    <split>/lang_annotations/auto_lang_ann.npy   {"info": {"indx": [(first, last), ...]},
                                                  "language": {"ann": [...], "task": [...]}}

With language annotations, each annotated window is an episode (what CALVIN trains on); without,
each recorded run is. robot_obs is tcp position (3), tcp Euler angles xyz (3), gripper width (1),
arm joints (7), gripper action (1); the gripper command for ee_delta is actions[:, 6].

auto_lang_ann.npy is a pickled dict (CALVIN's own format). It is read with a restricted unpickler
that rebuilds only numpy arrays and plain containers, so a hostile file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np

from gr2.robot import layout as lay
from gr2.robot.actions import quat_from_euler
from gr2.robot.episode import ArrayFrames, Camera, EndEffector, Episode, EpisodeError, EpisodeRef

FORMAT = "calvin"
FPS = 30.0
CAMERAS = {"rgb_static": "static", "rgb_gripper": "gripper"}
# robot_obs and rel_actions as CALVIN documents them; its gripper action is -1 (open) or 1 (close).
# rel_actions are scaled and clipped to [-1, 1] (position x50, rotation x20): unitless deltas.
GRIPPER_ACTION = lay.binary_gripper("gripper_action")
STATE_LAYOUT = (lay.dims("tcp_x tcp_y tcp_z", "m") + lay.dims("tcp_rx tcp_ry tcp_rz", "rad")
                + (lay.continuous_gripper("gripper_width", unit="m"),)
                + lay.dims(" ".join(f"joint_{i}" for i in range(7)), "rad") + (GRIPPER_ACTION,))
ACTION_LAYOUT = lay.dims("dx dy dz drx dry drz", "1", "delta") + (lay.binary_gripper(),)
ANNOTATIONS = "lang_annotations/auto_lang_ann.npy"


def is_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "ep_start_end_ids.npy"))


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, numpy scalars and builtin containers; refuses every other class."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise EpisodeError(f"refusing to unpickle {module}.{name} from an annotation file")
        return super().find_class(module, name)


def load_object_npy(path: str):
    """The object stored in a .npy of dtype object (a pickle inside), through `_ArraysOnly`."""
    with open(path, "rb") as f:
        try:  # a cut or garbage header is numpy's ValueError ("EOF: reading magic string")
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, _, dtype = read_header(f)
            if dtype != object:
                return np.load(path)
            arr = _ArraysOnly(io.BufferedReader(f)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise EpisodeError(f"{path}: unreadable annotation file ({e})") from None
    return arr.item() if isinstance(arr, np.ndarray) and arr.shape == () else arr


def _annotations(root: str) -> list[tuple[int, int, str]] | None:
    path = os.path.join(root, ANNOTATIONS)
    if not os.path.exists(path):
        return None
    ann = load_object_npy(path)
    try:
        return [(int(a), int(b), str(text)) for (a, b), text in zip(ann["info"]["indx"], ann["language"]["ann"])]
    except (KeyError, TypeError, ValueError, IndexError, ArithmeticError) as e:
        raise EpisodeError(f"{path}: not CALVIN's {{'info': {{'indx': [(first, last), ...]}}, 'language': "
                           f"{{'ann': [...]}}}} ({type(e).__name__}: {e})") from None


def list_episodes(root: str, dataset: str | None = None) -> list[EpisodeRef]:
    name = dataset or os.path.basename(os.path.normpath(root))
    spans = _annotations(root)
    if spans is None:
        path = os.path.join(root, "ep_start_end_ids.npy")
        try:
            spans = [(int(a), int(b), "") for a, b in np.load(path)]
        except (OSError, ValueError, TypeError, ArithmeticError, EOFError) as e:  # cut, text, NaN, not [[first, last]]
            raise EpisodeError(f"{path}: not a readable [[first, last], ...] integer array "
                               f"({type(e).__name__}: {e})") from None
    cams = tuple(sorted(CAMERAS.values()))
    return [EpisodeRef(FORMAT, root, f"{a:07d}-{b:07d}", cams, name) for a, b, _ in spans]



def index_files(files: list[str]) -> list[str]:
    """Of a source's files (relative to its root), those `list_episodes` reads."""
    return [f for f in files if f in ("ep_start_end_ids.npy", ANNOTATIONS)]


def episode_files(ref: EpisodeRef, files: list[str]) -> list[str]:
    """Of a source's files, those `load_episode(ref)` reads: the annotations and one npz per step."""
    first, last = (int(v) for v in ref.key.split("-"))
    steps = {f"episode_{i:07d}.npz" for i in range(first, last + 1)}
    return [f for f in files if f == ANNOTATIONS or f in steps]


def load_episode(ref: EpisodeRef) -> Episode:
    first, last = (int(v) for v in ref.key.split("-"))
    instruction = None
    for a, b, text in _annotations(ref.source) or []:
        if (a, b) == (first, last):
            instruction = text or None
            break
    if last < first:
        raise EpisodeError(f"{ref.uri}: no steps (the episode ends at {last}, before it starts at {first})")
    steps = []
    for i in range(first, last + 1):
        path = os.path.join(ref.source, f"episode_{i:07d}.npz")
        try:
            with np.load(path) as npz:
                steps.append({k: npz[k] for k in ("actions", "rel_actions", "robot_obs", *CAMERAS) if k in npz})
        # An empty file is EOFError, a cut zip BadZipFile; MemoryError: a .npy header claiming an absurd shape.
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError) as e:
            raise EpisodeError(f"{ref.uri}: cannot read step {i - first} ({path}: {e})") from None
    for key in ("actions", "rel_actions", "robot_obs"):
        missing = [i for i, s in enumerate(steps) if key not in s]
        if missing:
            raise EpisodeError(f"{ref.uri}: {key} missing at step {missing[0]}")
    robot_obs = _stack(ref, steps, "robot_obs")
    actions = _stack(ref, steps, "actions")
    t = np.arange(len(steps)) / FPS
    cameras = {}
    for key, name in CAMERAS.items():
        if all(key in s for s in steps):
            shapes, dtypes = {s[key].shape for s in steps}, {s[key].dtype for s in steps}
            # uint8 [H, W, 3] at every step: floats would be cast to pixels silently, NaN and all.
            if len(shapes) > 1 or len(next(iter(shapes))) != 3 or dtypes != {np.dtype(np.uint8)}:
                raise EpisodeError(f"{ref.uri}: {key} is not a uint8 [H, W, 3] image of one size at every step "
                                   f"(shapes {sorted(shapes)}, dtypes {sorted(map(str, dtypes))})")
            cameras[name] = Camera(name, t.copy(), ArrayFrames(np.stack([s[key] for s in steps])), FPS)
    rel_actions = _stack(ref, steps, "rel_actions")
    ee = EndEffector(robot_obs[:, :3], quat_from_euler(robot_obs[:, 3:6], "xyz"), actions[:, 6:7], (lay.binary_gripper(),))
    return Episode(ref, instruction, t, robot_obs, rel_actions, cameras, ee, meta={"first": first, "last": last},
                   state_layout=lay.or_unknown(STATE_LAYOUT, robot_obs.shape[1], "state"),
                   action_layout=lay.or_unknown(ACTION_LAYOUT, rel_actions.shape[1], "action"))


def _stack(ref: EpisodeRef, steps: list[dict], key: str) -> np.ndarray:
    """`key` of every step as one float64 [steps, dims] array, or EpisodeError naming the key."""
    shapes = {np.shape(s[key]) for s in steps}
    if len(shapes) > 1 or len(next(iter(shapes))) != 1:
        raise EpisodeError(f"{ref.uri}: {key} is not one vector of the same width at every step (shapes {sorted(shapes)})")
    try:
        return np.stack([s[key] for s in steps]).astype(np.float64)
    except (ValueError, TypeError) as e:
        raise EpisodeError(f"{ref.uri}: {key} is not numeric ({e})") from None
