"""Actions: rotation helpers, ee_delta actions, statistics beside the tables, read-time windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gr2.lake.lake import Lake
from gr2.robot import actions as act


def _same_rotation(a: np.ndarray, b: np.ndarray) -> float:
    """Largest angle (rad) between two arrays of quaternions, sign-blind (arccos: ~1e-8 resolution)."""
    dots = np.abs(np.sum(act.quat_normalize(a) * act.quat_normalize(b), axis=-1)).clip(0, 1)
    return float(np.max(2 * np.arccos(dots)))


def integrate(pos0: np.ndarray, quat0: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Poses reached from (pos0, quat0) by applying ee_delta `actions`, through scipy's rotations."""
    pos, rot = [np.asarray(pos0, np.float64)], [Rotation.from_quat(quat0)]
    for a in np.asarray(actions, np.float64):
        pos.append(pos[-1] + a[:3])
        rot.append(Rotation.from_rotvec(a[3:6]) * rot[-1])
    return np.stack(pos), np.stack([r.as_quat() for r in rot])


def test_euler_and_rotvec_helpers_agree_with_scipy():
    rng = np.random.default_rng(0)
    angles = rng.uniform(-np.pi, np.pi, (200, 3))
    for order in ("xyz", "zyx"):
        ours = act.quat_from_euler(angles, order)
        assert _same_rotation(ours, Rotation.from_euler(order, angles).as_quat()) < 1e-6
    quats = Rotation.random(200, random_state=1).as_quat()
    np.testing.assert_allclose(act.quat_to_rotvec(quats), Rotation.from_quat(quats).as_rotvec(), atol=1e-9)
    # A tiny rotation keeps its size rather than collapsing to zero.
    tiny = Rotation.from_rotvec([1e-9, 0, 0]).as_quat()
    np.testing.assert_allclose(act.quat_to_rotvec(tiny), [1e-9, 0, 0], rtol=1e-6)


def test_ee_delta_is_the_base_frame_rotation_between_steps_and_integrates_back():
    rng = np.random.default_rng(2)
    pos = np.cumsum(rng.normal(0, 0.01, (30, 3)), axis=0)
    quat = Rotation.from_rotvec(np.cumsum(rng.normal(0, 0.05, (30, 3)), axis=0)).as_quat()
    grip = rng.uniform(0, 1, (30, 1))
    a = act.ee_delta_actions(pos, quat, grip)
    assert a.shape == (29, 7)
    np.testing.assert_allclose(a[:, :3], np.diff(pos, axis=0), atol=1e-12)
    expected = (Rotation.from_quat(quat[1:]) * Rotation.from_quat(quat[:-1]).inv()).as_rotvec()
    np.testing.assert_allclose(a[:, 3:6], expected, atol=1e-9)
    np.testing.assert_array_equal(a[:, 6], grip[:-1, 0])
    pos2, quat2 = integrate(pos[0], quat[0], a)
    np.testing.assert_allclose(pos2, pos, atol=1e-9)
    assert _same_rotation(quat2, quat) < 1e-6


def test_statistics_are_per_dimension_and_stored_beside_the_tables(tmp_path):
    rng = np.random.default_rng(3)
    x = np.c_[rng.normal(5, 2, 10_000), rng.uniform(-1, 1, 10_000)]
    stats = act.compute_stats(x)
    assert set(stats) == {"mean", "std", "min", "max", "q01", "q99", "count"} and stats["count"] == 10_000
    assert abs(stats["mean"][0] - 5) < 0.1 and abs(stats["std"][0] - 2) < 0.1
    assert -1 <= stats["min"][1] < stats["q01"][1] < -0.95 and 0.95 < stats["q99"][1] < stats["max"][1] <= 1

    lake = Lake(str(tmp_path / "lake"))
    uri = act.write_stats(lake, "meta world/v1", {"action": stats})
    assert uri == str(tmp_path / "lake" / "stats" / "robot" / "meta_world_v1.json")
    assert json.loads(Path(uri).read_text())["action"]["q99"] == stats["q99"]


def test_windows_and_chunks_are_formed_at_read_time_with_padding_marked():
    idx = act.window_indices(5, history=2, chunk=3)
    np.testing.assert_array_equal(idx["history_index"][0], [0, 0])
    np.testing.assert_array_equal(idx["history_is_pad"][0], [True, False])
    np.testing.assert_array_equal(idx["chunk_index"][3], [3, 4, 4])
    np.testing.assert_array_equal(idx["chunk_is_pad"][3], [False, False, True])


def test_a_frame_stride_spaces_the_history_and_leaves_the_chunk_consecutive():
    idx = act.window_indices(12, history=3, chunk=2, stride=5)
    np.testing.assert_array_equal(idx["history_index"][11], [1, 6, 11])
    np.testing.assert_array_equal(idx["history_is_pad"][11], [False, False, False])
    np.testing.assert_array_equal(idx["history_index"][7], [0, 2, 7])  # 7-10 clamps to the first step
    np.testing.assert_array_equal(idx["history_is_pad"][7], [True, False, False])
    np.testing.assert_array_equal(idx["chunk_index"][7], [7, 8])
    with pytest.raises(ValueError, match="stride"):
        act.window_indices(5, 2, 2, stride=0)
