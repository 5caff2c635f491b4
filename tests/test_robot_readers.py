"""Each robot reader on a small file written here in its format (or a real sample), and bad input
turned into failed episodes whose reason names the episode, the field and the step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gr2.robot import annotated_json, calvin, hdf5, lerobot
from gr2.robot.episode import EpisodeError
from gr2.robot.ingest import IngestConfig, list_sources, process_episode, reader_for
from gr2.sim.record import write_mp4

SAMPLES = Path(__file__).parent / "data" / "robot"
STATE_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]


def frames(n: int, seed: int, size: int = 32) -> np.ndarray:
    """n distinct small frames (a moving bar on noise), so decoded frames can be told apart."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        out[i, :, (i * 3) % size] = 250
    return out


def trajectory(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos = np.cumsum(rng.normal(0, 0.01, (n, 3)), axis=0)
    rpy = np.cumsum(rng.normal(0, 0.02, (n, 3)), axis=0)
    grip = (np.arange(n) > n // 2).astype(float)[:, None]
    return np.c_[pos, rpy, grip], np.c_[rng.normal(0, 0.1, (n, 6)), grip]


def write_lerobot_v2(root: Path, lengths=(12, 10), fps: float = 10.0, cams=("front", "wrist")) -> Path:
    """A LeRobot v2.1 dataset: meta/, one parquet per episode, one mp4 per camera per episode."""
    (root / "meta").mkdir(parents=True)
    start = 0
    for e, n in enumerate(lengths):
        state, action = trajectory(n, e)
        data = root / f"data/chunk-000/episode_{e:06d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({
            "observation.state": list(state.astype(np.float32)), "action": list(action.astype(np.float32)),
            "timestamp": (np.arange(n) / fps).astype(np.float32), "frame_index": np.arange(n),
            "episode_index": np.full(n, e), "index": np.arange(start, start + n), "task_index": np.zeros(n, int),
        }).to_parquet(data, index=False)
        for c, cam in enumerate(cams):
            write_mp4(str(root / f"videos/chunk-000/observation.images.{cam}/episode_{e:06d}.mp4"), list(frames(n, 10 * e + c)), fps)
        start += n
    features = {f"observation.images.{c}": {"dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channel"],
                                             "info": {"video.fps": fps}} for c in cams}
    features.update({"observation.state": {"dtype": "float32", "shape": [7], "names": STATE_NAMES},
                     "action": {"dtype": "float32", "shape": [7], "names": {"motors": [f"a{i}" for i in range(6)] + ["gripper"]}},
                     "timestamp": {"dtype": "float32", "shape": [1], "names": None}})
    info = {"codebase_version": "v2.1", "fps": fps, "chunks_size": 1000, "features": features,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"}
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps({"episode_index": e, "tasks": ["stack the cups"], "length": n}) + "\n"
                                                      for e, n in enumerate(lengths)))
    (root / "meta/tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "stack the cups"}) + "\n")
    return root


@pytest.fixture
def v2(tmp_path) -> Path:
    return write_lerobot_v2(tmp_path / "v2")


def test_lerobot_v2_reads_states_actions_cameras_and_the_end_effector(v2):
    refs = lerobot.list_episodes(str(v2))
    assert [r.key for r in refs] == ["episode_000000", "episode_000001"]
    assert refs[0].cameras == ("front", "wrist") and reader_for(str(v2)) is lerobot
    ep = lerobot.load_episode(refs[0])
    ep.validate()
    assert ep.length == 12 and ep.instruction == "stack the cups" and ep.fps == pytest.approx(10.0, rel=1e-5)
    front = ep.cameras["front"]
    np.testing.assert_allclose(front.timestamps_s, np.arange(12) / 10.0, atol=1e-3)  # from the mp4's own clock
    got = front.frames.get([0, 7])
    want = frames(12, 0)[[0, 7]]
    assert np.abs(got.astype(int) - want).mean() < 12  # H.264 at crf 18 on tiny noisy frames
    # Roll-pitch-yaw named in the state -> an end effector; the gripper command comes from the action.
    assert ep.end_effector is not None
    np.testing.assert_array_equal(ep.end_effector.effector[:, 0], ep.action[:, 6])


def write_lerobot_v3(root: Path, fps: float = 10.0, lengths=(9, 6)) -> tuple[list, list]:
    """A LeRobot v3.0 dataset: both episodes in one parquet and one mp4; returns (states, frames) per episode."""
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    states = [trajectory(n, e) for e, n in enumerate(lengths)]
    allframes = [frames(n, 20 + e) for e, n in enumerate(lengths)]
    write_mp4(str(root / "videos/observation.images.top/chunk-000/file-000.mp4"), list(np.concatenate(allframes)), fps)
    rows, starts = [], np.cumsum((0,) + lengths)
    for e, n in enumerate(lengths):
        for i in range(n):
            rows.append({"observation.state": states[e][0][i].astype(np.float32), "action": states[e][1][i].astype(np.float32),
                         "timestamp": np.float32(i / fps), "frame_index": i, "episode_index": e, "index": int(starts[e] + i), "task_index": e})
    (root / "data/chunk-000").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "data/chunk-000/file-000.parquet", index=False)
    pq.write_table(pa.table({
        "episode_index": list(range(len(lengths))), "tasks": [["open the box"], ["close the box"]], "length": list(lengths),
        "data/chunk_index": [0, 0], "data/file_index": [0, 0],
        "dataset_from_index": starts[:-1].tolist(), "dataset_to_index": starts[1:].tolist(),
        "videos/observation.images.top/chunk_index": [0, 0], "videos/observation.images.top/file_index": [0, 0],
        "videos/observation.images.top/from_timestamp": (starts[:-1] / fps).tolist(),
        "videos/observation.images.top/to_timestamp": (starts[1:] / fps).tolist(),
    }), root / "meta/episodes/chunk-000/file-000.parquet")
    info = {"codebase_version": "v3.0", "fps": fps, "features": {
        "observation.images.top": {"dtype": "video", "shape": [32, 32, 3], "info": {"video.fps": fps}},
        "observation.state": {"dtype": "float32", "shape": [7], "names": [f"j{i}" for i in range(7)]},
        "action": {"dtype": "float32", "shape": [7]}},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}
    (root / "meta/info.json").write_text(json.dumps(info))
    return states, allframes


def test_lerobot_v3_finds_each_episode_inside_shared_files(tmp_path):
    root, fps = tmp_path / "v3", 10.0
    states, allframes = write_lerobot_v3(root, fps)
    refs = lerobot.list_episodes(str(root))
    second = lerobot.load_episode(refs[1])
    second.validate()
    assert second.length == 6 and second.instruction == "close the box" and second.end_effector is None
    top = second.cameras["top"]
    assert len(top.frames) == 6
    np.testing.assert_allclose(top.timestamps_s, np.arange(6) / fps, atol=1e-3)
    np.testing.assert_allclose(second.state, states[1][0], atol=1e-6)
    # The second episode's first frame is frame 9 of the shared file: its bar sits at column 0.
    assert np.abs(top.frames.get([0]).astype(int) - allframes[1][0]).mean() < 12


def test_robomimic_hdf5_reads_demos_with_eef_pose_and_language(tmp_path):
    import h5py

    path = tmp_path / "lift.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "env_kwargs": {"control_freq": 20}})
        data.attrs["problem_info"] = json.dumps({"language_instruction": "lift the cube"})
        for d, n in enumerate((8, 5)):
            g = data.create_group(f"demo_{d}")
            g["actions"] = np.random.default_rng(d).normal(size=(n, 7))
            g["obs/agentview_image"] = frames(n, d)
            g["obs/robot0_eye_in_hand_image"] = frames(n, d + 5)
            g["obs/robot0_eef_pos"] = np.cumsum(np.full((n, 3), 0.01), axis=0)
            g["obs/robot0_eef_quat"] = np.tile([0, 0, 0, 1.0], (n, 1))
            g["obs/robot0_gripper_qpos"] = np.zeros((n, 2))
    refs = hdf5.list_episodes(str(path))
    assert [r.key for r in refs] == ["lift.hdf5:demo_0", "lift.hdf5:demo_1"]
    assert refs[0].format == hdf5.ROBOMIMIC and refs[0].cameras == ("agentview", "robot0_eye_in_hand")
    ep = hdf5.load_episode(refs[1])
    ep.validate()
    assert ep.length == 5 and ep.instruction == "lift the cube" and ep.state.shape == (5, 9)
    np.testing.assert_allclose(ep.timestamps_s, np.arange(5) / 20)
    np.testing.assert_array_equal(ep.cameras["agentview"].frames.get([3, 1]), frames(5, 1)[[3, 1]])
    np.testing.assert_allclose(ep.end_effector.effector[:, 0], ep.action[:, 6])


def test_aloha_hdf5_reads_raw_and_jpeg_compressed_images(tmp_path):
    import h5py

    from gr2.robot.episode import decode_jpeg, encode_jpeg

    n = 6
    for compress in (False, True):
        path = tmp_path / ("compressed" if compress else "raw") / "episode_0.hdf5"
        path.parent.mkdir()
        imgs = frames(n, 3, size=48)
        with h5py.File(path, "w") as f:
            f.attrs["sim"], f.attrs["compress"] = False, compress
            f["action"] = np.zeros((n, 14))
            f["observations/qpos"] = np.arange(n * 14, dtype=float).reshape(n, 14)
            if compress:
                enc = [np.frombuffer(encode_jpeg(im, 95), np.uint8) for im in imgs]
                padded = np.zeros((n, max(len(e) for e in enc)), np.uint8)
                for i, e in enumerate(enc):
                    padded[i, : len(e)] = e
                f["observations/images/cam_high"] = padded
            else:
                f["observations/images/cam_high"] = imgs
        refs = hdf5.list_episodes(str(path.parent))
        assert [(r.format, r.key, r.cameras) for r in refs] == [(hdf5.ALOHA, "episode_0.hdf5", ("cam_high",))]
        ep = hdf5.load_episode(refs[0])
        ep.validate()
        assert ep.end_effector is None and ep.fps == pytest.approx(50.0)
        got = ep.cameras["cam_high"].frames.get([2, 0])
        want = np.stack([decode_jpeg(bytes(enc[i])) for i in (2, 0)]) if compress else imgs[[2, 0]]
        np.testing.assert_array_equal(got, want)  # the padding after each JPEG is ignored


def write_calvin(root: Path) -> Path:
    """A CALVIN split: 30 steps of npz, one recorded run, two annotated windows."""
    (root / "lang_annotations").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(100, 130):
        robot_obs = np.r_[rng.normal(size=3), rng.normal(size=3) * 0.1, 0.07, rng.normal(size=7), 1.0]
        np.savez(root / f"episode_{i:07d}.npz", actions=np.r_[robot_obs[:6], 1.0], rel_actions=rng.uniform(-1, 1, 7),
                 robot_obs=robot_obs, scene_obs=np.zeros(24), rgb_static=frames(1, i, 40)[0], rgb_gripper=frames(1, i + 1, 24)[0])
    np.save(root / "ep_start_end_ids.npy", np.array([[100, 129]]))
    ann = {"info": {"indx": [(100, 111), (115, 129)]}, "language": {"ann": ["push the blue block", "open the drawer"], "task": ["push", "open"]}}
    np.save(root / "lang_annotations" / "auto_lang_ann.npy", ann)  # np.save pickles the dict, as CALVIN does
    return root


def test_calvin_reads_annotated_windows_with_their_instructions(tmp_path):
    root = write_calvin(tmp_path / "calvin" / "validation")
    refs = calvin.list_episodes(str(root))
    assert [r.key for r in refs] == ["0000100-0000111", "0000115-0000129"] and reader_for(str(root)) is calvin
    ep = calvin.load_episode(refs[1])
    ep.validate()
    assert ep.length == 15 and ep.instruction == "open the drawer" and ep.fps == pytest.approx(30.0)
    assert set(ep.cameras) == {"static", "gripper"} and ep.cameras["gripper"].frames.get([0]).shape == (1, 24, 24, 3)
    assert ep.state.shape == (15, 15) and ep.action.shape == (15, 7)


@pytest.mark.parametrize("name,views,steps,text", [
    ("rt1", ("rgb",), 29, "pick brown chip bag"),
    ("bridge", ("rgb",), 24, "put pot or pan from sink into drying rack"),
    ("xhand", ("0", "1", "2"), 136, "Move the mango to the basket."),
])
def test_annotated_json_reads_the_real_samples(name, views, steps, text):
    refs = annotated_json.list_episodes(str(SAMPLES / name))
    assert len(refs) == 1 and refs[0].cameras == views
    ep = annotated_json.load_episode(refs[0])
    ep.validate()
    assert ep.length == steps and ep.instruction == text and ep.end_effector is not None
    for cam in ep.cameras.values():
        assert len(cam.frames) == steps and cam.frames.get([steps - 1]).dtype == np.uint8


def test_real_samples_become_accepted_episodes_with_ee_delta_actions():
    config = IngestConfig()
    for name in ("rt1", "bridge", "xhand"):
        refs, failed = list_sources([str(SAMPLES / name)])
        assert not failed
        row, steps = process_episode(refs[0], config, "test")
        assert row["status"] == "accepted", row["reason"]
        assert row["action_space"] == "ee_delta" and row["flagged_steps"] == 0
        assert row["action_dim"] == (7 if name != "xhand" else 18)  # xhand: 12 hand joints after the 6-d delta
        assert len(steps) == row["length"] and steps.column("action")[row["length"] - 1].as_py() is None
        views = steps.column("views")[0].as_py()
        assert [v["camera"] for v in views] == row["cameras"] and all(v["jpeg"][:2] == b"\xff\xd8" for v in views)


# -- bad input: failed, with a reason naming the episode, the field and the step ----------------------


def _corrupt_episode(root: Path, index: int, **columns) -> None:
    path = root / f"data/chunk-000/episode_{index:06d}.parquet"
    df = pd.read_parquet(path)
    for fn in columns.values():
        df = fn(df)
    df.to_parquet(path, index=False)


def _process(root: Path, index: int, config: IngestConfig = IngestConfig()) -> dict:
    refs = lerobot.list_episodes(str(root))
    row, steps = process_episode(refs[index], config, "test")
    assert (steps is None) == (row["status"] != "accepted")
    return row


def _set(col: str, step: int, dim: int, value: float):
    def fn(df):
        values = [np.array(v, np.float32) for v in df[col]]
        values[step][dim] = value
        df[col] = values
        return df
    return fn


@pytest.mark.parametrize("column,dim,value,field", [
    ("observation.state", 2, np.nan, "state is nan at step 5 (dim 2)"),
    ("action", 6, np.inf, "action is inf at step 5 (dim 6)"),
])
def test_non_finite_values_fail_the_episode_naming_field_and_step(v2, column, dim, value, field):
    _corrupt_episode(v2, 1, fix=_set(column, 5, dim, value))
    row = _process(v2, 1)
    assert row["status"] == "failed" and f"{v2}#episode_000001" in row["reason"] and field in row["reason"]
    assert _process(v2, 0)["status"] == "accepted"  # the rest goes on


def test_length_mismatch_between_streams_fails_the_episode(tmp_path):
    import shutil

    root = shutil.copytree(SAMPLES / "rt1", tmp_path / "rt1")
    path = root / "annotation/val/6.json"
    ann = json.loads(path.read_text())
    ann["action"] = ann["action"][:12]
    path.write_text(json.dumps(ann))
    refs, _ = list_sources([str(root)])
    row, steps = process_episode(refs[0], IngestConfig(), "test")
    assert row["status"] == "failed" and steps is None
    assert row["reason"] == f"{root}#val/6: length mismatch: state has 29 steps, action has 12"


def test_camera_timestamps_that_do_not_match_the_video_fail_the_episode(v2):
    info = json.loads((v2 / "meta/info.json").read_text())
    info["camera_timestamps_path"] = "timestamps/{video_key}/episode_{episode_index:06d}.parquet"
    (v2 / "meta/info.json").write_text(json.dumps(info))
    for e, n in enumerate((12, 10)):
        for cam in ("front", "wrist"):
            out = v2 / f"timestamps/observation.images.{cam}/episode_{e:06d}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            m = n - 2 if (e, cam) == (1, "wrist") else n
            pd.DataFrame({"frame_index": np.arange(m), "timestamp": np.arange(m) / 10 + 0.02}).to_parquet(out)
    row = _process(v2, 1)
    assert row["status"] == "failed"
    assert "length mismatch: 10 frames but 8 camera wrist timestamps" in row["reason"]
    assert _process(v2, 0)["status"] == "accepted"


def test_non_monotonic_timestamps_fail_the_episode_naming_the_step(v2):
    def fn(df):
        ts = df["timestamp"].to_numpy().copy()
        ts[4] = ts[2]
        df["timestamp"] = ts
        return df
    _corrupt_episode(v2, 0, fix=fn)
    row = _process(v2, 0)
    assert row["status"] == "failed"
    assert "timestamps not increasing: step 4 at 0.200000s is not after step 3 at 0.300000s" in row["reason"]


def test_a_camera_missing_from_one_episode_fails_that_episode_only(v2):
    os.remove(v2 / "videos/chunk-000/observation.images.wrist/episode_000001.mp4")
    row = _process(v2, 1)
    assert row["status"] == "failed" and "camera wrist missing" in row["reason"] and "episode_000001" in row["reason"]
    assert _process(v2, 0)["status"] == "accepted"


def test_an_unreadable_video_fails_the_episode_naming_the_camera_and_file(v2):
    bad = v2 / "videos/chunk-000/observation.images.front/episode_000000.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    row = _process(v2, 0)
    assert row["status"] == "failed" and "camera front: unreadable video" in row["reason"] and str(bad) in row["reason"]
    assert _process(v2, 1)["status"] == "accepted"


def test_a_configured_camera_the_episode_lacks_fails_it(v2):
    row = _process(v2, 0, IngestConfig(cameras=("front", "depth")))
    assert row["status"] == "failed" and "camera depth missing" in row["reason"]


def test_an_unlistable_source_is_a_failed_row_not_an_exception(tmp_path):
    (tmp_path / "empty").mkdir()
    refs, failed = list_sources([str(tmp_path / "nope"), str(tmp_path / "empty")])
    assert refs == [] and [r["status"] for r in failed] == ["failed", "failed"]
    assert "no such file or directory" in failed[0]["reason"] and "not a robot dataset" in failed[1]["reason"]
    with pytest.raises(EpisodeError, match="not a robot dataset"):
        reader_for(str(tmp_path / "empty"))


def test_content_id_is_stable_and_changes_with_content(v2):
    refs = lerobot.list_episodes(str(v2))
    first = lerobot.load_episode(refs[0]).content_id()
    assert first == lerobot.load_episode(refs[0]).content_id() != lerobot.load_episode(refs[1]).content_id()
    _corrupt_episode(v2, 0, fix=_set("observation.state", 3, 0, 0.5))
    assert lerobot.load_episode(refs[0]).content_id() != first
