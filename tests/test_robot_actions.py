"""Actions: rotation helpers, ee_delta actions, statistics beside the tables, read-time windows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.spatial.transform import Rotation

from gr2.lake.lake import Lake
from gr2.robot import actions as act


def _same_rotation(a: np.ndarray, b: np.ndarray) -> float:
    """Largest angle (rad) between two arrays of quaternions, sign-blind (arccos: ~1e-8 resolution)."""
    dots = np.abs(np.sum(act.quat_normalize(a) * act.quat_normalize(b), axis=-1)).clip(0, 1)
    return float(np.max(2 * np.arccos(dots)))


def test_euler_and_rotvec_helpers_agree_with_scipy():
    rng = np.random.default_rng(0)
    angles = rng.uniform(-np.pi, np.pi, (200, 3))
    for order in ("xyz", "zyx"):
        ours = act.quat_from_euler(angles, order)
        assert _same_rotation(ours, Rotation.from_euler(order, angles).as_quat()) < 1e-6
    quats = Rotation.random(200, random_state=1).as_quat()
    np.testing.assert_allclose(act.quat_to_rotvec(quats), Rotation.from_quat(quats).as_rotvec(), atol=1e-9)
    assert _same_rotation(act.rotvec_to_quat(act.quat_to_rotvec(quats)), quats) < 1e-6
    # A tiny rotation keeps its size rather than collapsing to zero.
    np.testing.assert_allclose(act.quat_to_rotvec(act.rotvec_to_quat(np.array([1e-9, 0, 0]))), [1e-9, 0, 0], rtol=1e-6)


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
    pos2, quat2 = act.integrate_ee_delta(pos[0], quat[0], a)
    np.testing.assert_allclose(pos2, pos, atol=1e-9)
    assert _same_rotation(quat2, quat) < 1e-6


def test_statistics_are_per_dimension_and_stored_beside_the_tables(tmp_path):
    rng = np.random.default_rng(3)
    x = np.c_[rng.normal(5, 2, 10_000), rng.uniform(-1, 1, 10_000)]
    stats = act.compute_stats(x)
    assert set(stats) == {*act.STAT_NAMES, "count"} and stats["count"] == 10_000
    assert abs(stats["mean"][0] - 5) < 0.1 and abs(stats["std"][0] - 2) < 0.1
    assert -1 <= stats["min"][1] < stats["q01"][1] < -0.95 and 0.95 < stats["q99"][1] < stats["max"][1] <= 1
    z = act.normalize(x, stats)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(act.unnormalize(act.normalize(x, stats, "q01_q99"), stats, "q01_q99"), x, atol=1e-9)

    lake = Lake(str(tmp_path / "lake"))
    uri = act.write_stats(lake, "meta world/v1", {"action": stats})
    assert uri == str(tmp_path / "lake" / "stats" / "robot" / "meta_world_v1.json")
    assert act.read_stats(lake.root, "meta world/v1")["action"]["q99"] == stats["q99"]


def test_windows_and_chunks_are_formed_at_read_time_with_padding_marked():
    idx = act.window_indices(5, history=2, chunk=3)
    np.testing.assert_array_equal(idx["history_index"][0], [0, 0])
    np.testing.assert_array_equal(idx["history_is_pad"][0], [True, False])
    np.testing.assert_array_equal(idx["chunk_index"][3], [3, 4, 4])
    np.testing.assert_array_equal(idx["chunk_is_pad"][3], [False, False, True])

    # One episode's steps, shuffled, with the last action null (an ee_delta episode's last step).
    steps = pa.table({
        "step": [2, 0, 3, 1],
        "state": [[2.0], [0.0], [3.0], [1.0]],
        "action": [[20.0, 2.0], [0.0, 0.0], None, [10.0, 1.0]],
    })
    w = act.episode_windows(steps, history=2, chunk=2)
    assert w["state"].shape == (4, 2, 1) and w["action"].shape == (4, 2, 2)
    np.testing.assert_array_equal(w["state"][1, :, 0], [0.0, 1.0])
    np.testing.assert_array_equal(w["action"][1, :, 0], [10.0, 20.0])
    np.testing.assert_array_equal(w["action_is_pad"][2], [False, True])  # step 3 has no action
    np.testing.assert_array_equal(w["action_is_pad"][3], [True, True])


def test_unknown_normalisation_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown normalisation mode"):
        act.normalize(np.zeros((2, 1)), act.compute_stats(np.zeros((2, 1))), "zscore")
