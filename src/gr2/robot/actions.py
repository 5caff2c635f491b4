"""Actions: Cartesian end-effector deltas plus the effector command, their statistics, and
history windows / action chunks formed at read time.

The canonical action space, `ee_delta` (GR-2 predicts chunks of these), for the step t -> t+1:

    [dx, dy, dz]   position change in metres, robot base frame
    [rx, ry, rz]   rotation change as a rotation vector (axis * angle, radians) of
                   R_{t+1} R_t^T, i.e. the rotation applied in the base frame; ||r|| <= pi
    [e_1 .. e_k]   the end-effector command at t as the source gives it: one gripper value
                   (k=1), or a hand's joint targets (k>1). Absolute, not a delta.

A rotation vector rather than Euler deltas because it has no gimbal lock and no order convention
to get wrong, and is continuous for the small rotations a step makes. The last step has no
t+1, so its action is null (flagged "action:none"), never a made-up zero.

Quaternions are (x, y, z, w). The few rotation helpers live here rather than in scipy because
scipy is not a dependency of the base install; tests check them against scipy.
"""

from __future__ import annotations

import json

import numpy as np

from gr2.lake.uri import arrow_filesystem

ACTION_SPACE = "ee_delta"


# -- rotations ----------------------------------------------------------------------------------


def quat_normalize(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return np.concatenate([-q[..., :3], q[..., 3:]], axis=-1)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a * b (apply b, then a)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ax, ay, az, aw = np.moveaxis(a, -1, 0)
    bx, by, bz, bw = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ],
        axis=-1,
    )


def quat_to_rotvec(q: np.ndarray) -> np.ndarray:
    """Unit quaternions -> rotation vectors (axis * angle, angle in [0, pi])."""
    q = quat_normalize(q)
    q = np.where(q[..., 3:4] < 0, -q, q)  # q and -q are one rotation; take the short way round
    xyz, w = q[..., :3], np.clip(q[..., 3], -1.0, 1.0)
    s = np.linalg.norm(xyz, axis=-1)
    angle = 2.0 * np.arctan2(s, w)
    # angle / sin(angle/2) -> 2 as the angle -> 0 (its Taylor series keeps small steps exact).
    small = s < 1e-8
    scale = np.where(small, 2.0 + (angle**2) / 12.0, angle / np.where(small, 1.0, s))
    return xyz * scale[..., None]


def quat_from_euler(angles: np.ndarray, order: str = "xyz") -> np.ndarray:
    """Extrinsic Euler angles (radians; `order` is the axis sequence, e.g. roll-pitch-yaw 'xyz')."""
    angles = np.asarray(angles, dtype=np.float64)
    q = np.zeros(angles.shape[:-1] + (4,))
    q[..., 3] = 1.0
    for i, axis in enumerate(order.lower()):
        half = angles[..., i] / 2
        step = np.zeros_like(q)
        step[..., "xyz".index(axis)] = np.sin(half)
        step[..., 3] = np.cos(half)
        q = quat_multiply(step, q)  # extrinsic: each later rotation is applied in the fixed frame
    return q


def quat_from_wxyz(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return np.concatenate([q[..., 1:], q[..., :1]], axis=-1)


# -- the canonical action -----------------------------------------------------------------------


def ee_delta_actions(pos: np.ndarray, quat: np.ndarray, effector: np.ndarray) -> np.ndarray:
    """[T-1, 6+k] ee_delta actions from a pose per step (see the module docstring)."""
    pos, quat = np.asarray(pos, np.float64), quat_normalize(quat)
    effector = np.asarray(effector, np.float64).reshape(len(pos), -1)
    dpos = pos[1:] - pos[:-1]
    drot = quat_to_rotvec(quat_multiply(quat[1:], quat_conjugate(quat[:-1])))
    return np.concatenate([dpos, drot, effector[:-1]], axis=-1)


# -- normalisation statistics -------------------------------------------------------------------


def compute_stats(values: np.ndarray, quantiles: tuple[float, ...] = (0.01, 0.99)) -> dict[str, list[float]]:
    """Per-dimension mean, std, min, max, the `quantiles` (as q01, q99, ...) and the count of [N, D] values."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"statistics need [N, D] values with N > 0, got shape {x.shape}")
    out = {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "min": x.min(0).tolist(), "max": x.max(0).tolist()}
    for q, value in zip(quantiles, np.quantile(x, quantiles, axis=0)):
        out[f"q{round(q * 100):02d}"] = value.tolist()
    return {**out, "count": int(len(x))}


def normalize(x: np.ndarray, stats: dict, mode: str = "mean_std", eps: float = 1e-8) -> np.ndarray:
    """Scale by the statistics: mean_std -> zero mean unit std; q01_q99 / min_max -> [-1, 1]."""
    x = np.asarray(x, dtype=np.float64)
    if mode == "mean_std":
        return (x - np.asarray(stats["mean"])) / _std(stats, eps)
    lo, hi = _range(stats, mode)
    return 2.0 * (x - lo) / np.maximum(hi - lo, eps) - 1.0


def unnormalize(y: np.ndarray, stats: dict, mode: str = "mean_std", eps: float = 1e-8) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if mode == "mean_std":
        return y * _std(stats, eps) + np.asarray(stats["mean"])
    lo, hi = _range(stats, mode)
    return (y + 1.0) / 2.0 * np.maximum(hi - lo, eps) + lo


def _std(stats: dict, eps: float) -> np.ndarray:
    # A dimension that never moves (std below eps) is centred, not blown up; every other is divided
    # by its std exactly, so statistics that are floored already (training's) come back unchanged.
    std = np.asarray(stats["std"], np.float64)
    return np.where(std < eps, 1.0, std)


def _range(stats: dict, mode: str) -> tuple[np.ndarray, np.ndarray]:
    keys = {"q01_q99": ("q01", "q99"), "min_max": ("min", "max")}
    if mode not in keys:
        raise ValueError(f"unknown normalisation mode {mode!r}: mean_std, q01_q99 or min_max")
    lo, hi = keys[mode]
    return np.asarray(stats[lo], np.float64), np.asarray(stats[hi], np.float64)


def stats_uri(lake_root: str, dataset: str) -> str:
    """Where a dataset's statistics live: beside the tables, as LeRobot keeps meta/stats.json."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset) or "default"
    return f"{lake_root.rstrip('/')}/stats/robot/{safe}.json"


def write_stats(lake, dataset: str, stats: dict) -> str:
    """Write `stats` ({"action": {...}, "state": {...}, ...}) for `dataset` under the lake's lease."""
    uri = stats_uri(lake.root, dataset)
    fs, path = arrow_filesystem(uri)
    with lake.lease():
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps({"dataset": dataset, **stats}, indent=1).encode())
    return uri


# -- windows and chunks, at read time -------------------------------------------------------------


def window_indices(length: int, history: int, chunk: int, stride: int = 1) -> dict[str, np.ndarray]:
    """Index arrays that turn one episode's steps into (history window, action chunk) samples.

    For each step t: `history_index[t]` = t-(h-1)s .. t-s, t (s: `stride`, steps between history
    frames) and `chunk_index[t]` = t .. t+k-1, clamped to the episode, with `*_is_pad` marking the
    clamped entries (LeRobot's convention), so nothing is stored k times and the end of an episode
    is never mistaken for real data.
    """
    if length < 1 or history < 1 or chunk < 1 or stride < 1:
        raise ValueError(f"need length, history, chunk and stride >= 1, got {length}, {history}, {chunk}, {stride}")
    t = np.arange(length)[:, None]
    hist = t + np.arange(-history + 1, 1)[None, :] * stride
    fut = t + np.arange(chunk)[None, :]
    return {
        "history_index": np.clip(hist, 0, length - 1),
        "history_is_pad": hist < 0,
        "chunk_index": np.clip(fut, 0, length - 1),
        "chunk_is_pad": fut > length - 1,
    }


def step_arrays(steps, state: str = "state", action: str = "action",
                action_dim: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(state [n, D], action [n, A], action_missing [n]) of one episode's steps (a pyarrow Table, in
    its order) as float64; a null action (an ee_delta episode's last step) is zeros, and missing.

    action_dim: the width of a null action; None: that of the episode's other actions."""
    states = np.asarray(steps.column(state).to_pylist(), np.float64)
    acts = steps.column(action).to_pylist()
    width = action_dim if action_dim is not None else max((len(a) for a in acts if a is not None), default=0)
    missing = np.array([a is None for a in acts])
    actions = np.stack([np.asarray(a if a is not None else [0.0] * width, np.float64) for a in acts])
    return states, actions, missing


def windows(state: np.ndarray, action: np.ndarray, action_missing: np.ndarray, history: int,
            chunk: int, stride: int = 1) -> dict[str, np.ndarray]:
    """Every step's history window of `state` and chunk of `action`, with `*_is_pad` marking the
    clamped entries and the missing actions; `history_index` gathers other per-step arrays alike."""
    idx = window_indices(len(state), history, chunk, stride)
    return {
        "history_index": idx["history_index"],
        "state": state[idx["history_index"]],
        "state_is_pad": idx["history_is_pad"],
        "action": action[idx["chunk_index"]],
        "action_is_pad": idx["chunk_is_pad"] | action_missing[idx["chunk_index"]],
    }


def episode_windows(steps, history: int, chunk: int, state: str = "state", action: str = "action") -> dict[str, np.ndarray]:
    """History windows of states and chunks of actions (float32) for one episode's steps (a pyarrow
    Table), rows ordered by `step`."""
    import pyarrow.compute as pc

    steps = steps.take(pc.sort_indices(steps, [("step", "ascending")]))
    states, actions, missing = step_arrays(steps, state, action)
    return windows(states.astype(np.float32), actions.astype(np.float32), missing, history, chunk)
