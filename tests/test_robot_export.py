"""Lake episodes out as LeRobot v3.0: read back by gr2's own reader and by LeRobot 0.4.4 itself
(in .venv-lerobot, its own environment: it pins a torch older than ours)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from test_robot_readers import write_lerobot_v2, write_lerobot_v3

from gr2.lake.lake import Lake
from gr2.robot.episode import decode_jpeg, video_timestamps
from gr2.robot.export import ExportConfig, ExportError, export_lerobot, nearest_ok
from gr2.robot.ingest import IngestConfig, ingest
from gr2.sim.record import RecordConfig, record

REPO = Path(__file__).resolve().parent.parent
LEROBOT_PYTHON = REPO / ".venv-lerobot" / "bin" / "python"
ITERATE = Path(__file__).parent / "lerobot_iterate.py"


@pytest.fixture(scope="module")
def lake(tmp_path_factory, ray_local) -> Lake:
    """A v3.0 source at 10 Hz (one camera, native actions) and a v2.1 source at 20 Hz (two cameras,
    ee_delta actions from roll-pitch-yaw poses) in one lake. The front camera is declared 100 ms
    late, so the last steps of each 20 Hz episode have no front frame: flagged views."""
    d = tmp_path_factory.mktemp("export")
    write_lerobot_v3(d / "boxes", fps=10.0)
    write_lerobot_v2(d / "cups", fps=20.0)
    the_lake = Lake(str(d / "lake"))
    result = ingest([str(d / "boxes"), str(d / "cups")], the_lake, IngestConfig(offsets_s={"front": 0.1}))
    assert result.funnel["accepted"] == 4
    return the_lake


@pytest.fixture(scope="module")
def exported(lake, tmp_path_factory):
    out = tmp_path_factory.mktemp("lerobot") / "both"
    return out, export_lerobot(lake, str(out))


def lake_episode(lake: Lake, episode_id: str) -> tuple[dict, dict]:
    """(episode row, steps as columns in step order)."""
    row = lake.read("episodes", filter=f"episode_id = '{episode_id}'").to_pylist()[0]
    steps = lake.read("steps", filter=pc.field("episode_id") == episode_id).sort_by("step").to_pydict()
    return row, steps


def exported_episodes(root: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()


def test_each_state_rate_becomes_a_lerobot_dataset_of_its_own(exported):
    out, result = exported
    assert [(Path(d.root).name, d.fps, d.episodes, d.frames) for d in result.datasets] == [
        ("10hz", 10, 2, 9 + 6), ("20hz", 20, 2, 12 + 10)]
    assert result.skipped == []
    text = result.summary()
    assert "2 state rates (10, 20 Hz)" in text and "nothing was resampled" in text

    info = json.loads((out / "20hz/meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 20 and info["total_frames"] == 22
    f = info["features"]
    assert f["observation.state"]["names"] == ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
    assert f["action"]["names"] == ["dx", "dy", "dz", "rx", "ry", "rz", "gripper"]
    assert f["observation.images.front"]["shape"] == [32, 32, 3] and f["gr2.view_ok"]["names"] == ["front", "wrist"]
    slow = json.loads((out / "10hz/meta/info.json").read_text())["features"]
    assert slow["observation.state"]["names"] == [f"j{i}" for i in range(7)]  # the source's names
    assert slow["action"]["names"] == [f"action_{i}" for i in range(7)]  # the source named none


def test_every_frame_is_presented_at_its_step_time_exactly(exported):
    out, _ = exported
    for rate in ("10hz", "20hz"):
        fps = int(rate[:-2])
        for ep in exported_episodes(out / rate):
            keys = [k.split("/")[1] for k in ep if k.startswith("videos/") and k.endswith("/chunk_index")]
            for key in keys:
                path = out / rate / f"videos/{key}/chunk-000/file-000.mp4"
                pts = video_timestamps(str(path))
                start = round(ep[f"videos/{key}/from_timestamp"] * fps)
                mine = pts[start:start + ep["length"]]
                np.testing.assert_allclose(mine, ep[f"videos/{key}/from_timestamp"] + np.arange(ep["length"]) / fps,
                                           rtol=0, atol=1e-9)


def test_flagged_views_hold_the_nearest_good_frame_and_say_so(exported, lake):
    out, result = exported
    fast = next(d for d in result.datasets if d.fps == 20)
    import pyarrow.parquet as pq

    data = pq.read_table(out / "20hz/data/chunk-000/file-000.parquet").to_pydict()
    view_ok = np.asarray(data["gr2.view_ok"])
    lake_flagged = 0
    for ep in exported_episodes(out / "20hz"):
        _, steps = lake_episode(lake, ep["gr2/episode_id"])
        ok = np.asarray([[v["ok"] for v in views] for views in steps["views"]])
        lake_flagged += int((~ok).any(axis=1).sum())
        np.testing.assert_array_equal(view_ok[ep["dataset_from_index"]:ep["dataset_to_index"]], ok)
    assert lake_flagged > 0 and fast.held_views == lake_flagged
    assert f"{lake_flagged} steps had a flagged view" in result.summary()
    # The last step of every ee_delta episode has no action in the lake: filled and marked.
    assert fast.filled_actions == 2 and sum(not v for v in data["gr2.action_ok"]) == 2
    np.testing.assert_array_equal(nearest_ok(np.array([False, True, False, False, True, False])), [1, 1, 1, 4, 4, 4])


def test_gr2_reads_the_export_back_as_the_lake_holds_it(exported, lake, tmp_path):
    out, _ = exported
    again = Lake(str(tmp_path / "again"))
    result = ingest([str(out / "10hz"), str(out / "20hz")], again, IngestConfig())
    assert result.funnel["accepted"] == 4
    back = again.read("episodes").sort_by([("source", "ascending"), ("episode_key", "ascending")]).to_pylist()
    firsts = [ep for rate in ("10hz", "20hz") for ep in exported_episodes(out / rate)]
    assert len(back) == len(firsts)
    for row2, ep in zip(back, firsts):
        row1, steps1 = lake_episode(lake, ep["gr2/episode_id"])
        _, steps2 = lake_episode(again, row2["episode_id"])
        assert row2["instruction"] == row1["instruction"] and row2["length"] == row1["length"]
        assert row2["action_space"] == row1["action_space"]
        np.testing.assert_array_equal(np.asarray(steps2["state"], np.float32), np.asarray(steps1["state"], np.float32))
        a1, a2 = steps1["action"], steps2["action"]
        assert [a is None for a in a1] == [a is None for a in a2]
        np.testing.assert_allclose(np.asarray([a for a in a2 if a is not None], np.float32),
                                   np.asarray([a for a in a1 if a is not None], np.float32), rtol=0, atol=1e-6)
        # Flagged views stay flagged: the stand-in frames the export marked are left out again.
        assert row2["flagged_steps"] == row1["flagged_steps"]
        ok1, ok2 = ([[v["ok"] for v in views] for views in s["views"]] for s in (steps1, steps2))
        assert ok2 == ok1
        # Frames come back through H.264: each step shows (nearly) the lake's frame for it.
        for cam_index, cam in enumerate(row1["cameras"]):
            for i in (0, row1["length"] // 2):
                v1 = steps1["views"][i][cam_index]
                v2 = next(v for v in steps2["views"][i] if v["camera"] == cam)
                if v1["ok"]:
                    diff = np.abs(decode_jpeg(v2["jpeg"]).astype(int) - decode_jpeg(v1["jpeg"]).astype(int)).mean()
                    assert diff < 8, (cam, i, diff)


@pytest.fixture(scope="session")
def lerobot_python() -> Path:
    """LeRobot 0.4.4's own environment; `make` builds it when absent (7.5 to 8 minutes here, most of it
    copying torch's CUDA wheels)."""
    if not (LEROBOT_PYTHON.parent.parent / ".installed").exists():
        subprocess.run(["make", "-C", str(REPO), ".venv-lerobot/.installed"], check=True, timeout=1800)
    return LEROBOT_PYTHON


def lerobot_iterate(python: Path, root: Path, tmp_path: Path) -> tuple[dict, dict]:
    """LeRobot's view of the dataset at `root`: (JSON summary, arrays of every item)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    npz = tmp_path / f"{root.name}.npz"
    run = subprocess.run([str(python), str(ITERATE), str(root), str(npz)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), dict(np.load(npz))


def assert_lerobot_sees_the_lake(python: Path, root: Path, lake: Lake, tmp_path: Path) -> dict:
    """LeRobot iterates every item of the export at `root`, and each holds the lake's values; returns the summary."""
    summary, got = lerobot_iterate(python, root, tmp_path)
    episodes = exported_episodes(root)
    fps = json.loads((root / "meta/info.json").read_text())["fps"]
    assert summary["fps"] == fps and summary["episodes"] == len(episodes)
    assert summary["frames"] == sum(e["length"] for e in episodes) == len(got["state"])
    rows, steps = zip(*(lake_episode(lake, e["gr2/episode_id"]) for e in episodes))
    assert summary["tasks"] == [r["instruction"] for r in rows]
    assert summary["cameras"] == [f"observation.images.{c}" for c in rows[0]["cameras"]]

    state = np.concatenate([np.asarray(s["state"], np.float32) for s in steps])
    np.testing.assert_array_equal(got["state"], state)
    assert summary["state_checksum"] == pytest.approx(float(state.astype(np.float64).sum()), rel=1e-6)
    times = np.concatenate([np.arange(len(s["step"])) / fps for s in steps])
    np.testing.assert_allclose(got["timestamp"], times, atol=1e-6)
    start = 0
    for row, s in zip(rows, steps):
        n = len(s["step"])
        # The action chunk: the lake's actions at t, t+1, t+2, padded past the episode's end.
        for t in range(n):
            for k in range(3):
                assert got["action_is_pad"][start + t, k] == (t + k >= n)
                if t + k < n and s["action"][t + k] is not None:
                    np.testing.assert_allclose(got["action"][start + t, k], s["action"][t + k], atol=1e-7)
        # The frame LeRobot decodes for step t is the lake's frame for step t, not a neighbour's (within
        # H.264's noise, for cameras slower than the state whose neighbours look alike).
        for c, cam in enumerate(row["cameras"]):
            lake_frames = [decode_jpeg(v[c]["jpeg"]) if v[c]["ok"] else None for v in s["views"]]
            for t, want in enumerate(lake_frames):
                if want is not None:
                    mine = got[f"frame:observation.images.{cam}"][start + t].astype(int)
                    errors = [np.abs(mine - f.astype(int)).mean() for f in lake_frames if f is not None]
                    assert np.abs(mine - want.astype(int)).mean() <= min(errors) + 1.0 and min(errors) < 8
        start += n
    return summary


@pytest.mark.parametrize("rate", ["10hz", "20hz"])
def test_lerobot_iterates_every_item_within_its_default_tolerance(exported, lake, lerobot_python, tmp_path, rate):
    out, _ = exported
    summary = assert_lerobot_sees_the_lake(lerobot_python, out / rate, lake, tmp_path)
    assert summary["image_shape"] == [2, 3, 32, 32]  # the window: previous and current frame


def test_a_metaworld_recording_reaches_lerobot_with_its_flagged_views_marked(ray_local, lerobot_python, tmp_path):
    """The real recorder: 80 Hz state, a quaternion pose, cameras at 20 and 15 Hz with latency and drops."""
    source = tmp_path / "drawer"
    record(str(source), RecordConfig(episodes=1, width=64, height=64))
    lake = Lake(str(tmp_path / "lake"))
    assert ingest([str(source)], lake, IngestConfig()).funnel["accepted"] == 1
    result = export_lerobot(lake, str(tmp_path / "out"))
    (dataset,) = result.datasets
    row = lake.read("episodes").to_pylist()[0]
    assert (dataset.fps, dataset.frames, dataset.held_views) == (80, row["length"], row["flagged_steps"])
    assert row["flagged_steps"] > 0 and dataset.filled_actions == 1
    summary = assert_lerobot_sees_the_lake(lerobot_python, tmp_path / "out", lake, tmp_path)
    assert summary["tasks"] == ["open the drawer"] and summary["image_shape"] == [2, 3, 64, 64]


def _commands() -> argparse.ArgumentParser:
    from gr2.flows.robot_cli import register

    p = argparse.ArgumentParser(prog="gr2")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_export_lerobot_command_exports_what_where_selects_and_says_what_it_decided(lake, tmp_path):
    out = tmp_path / "cups"
    args = _commands().parse_args(["export-lerobot", "--lake", lake.root, "--out", str(out),
                                   "--where", "dataset = 'cups'", "--cameras", "wrist"])
    text = args.run(args)
    info = json.loads((out / "meta/info.json").read_text())  # one rate selected: the dataset is --out itself
    assert info["fps"] == 20
    assert [k for k in info["features"] if k.startswith("observation.images")] == ["observation.images.wrist"]
    assert f"{out}: LeRobot v3.0, 20 fps, 2 episodes, 22 frames, cameras wrist" in text
    assert "had a flagged view" not in text  # only the front camera was late

    # Episodes that lack a camera asked for are skipped, each with its reason, never silently.
    wrist = export_lerobot(lake, str(tmp_path / "wrist"), ExportConfig(cameras=("wrist",)))
    assert [d.fps for d in wrist.datasets] == [20] and len(wrist.skipped) == 2
    assert all("boxes#episode_00000" in s and "camera wrist missing" in s for s in wrist.skipped)
    assert "skipped 2 episodes" in wrist.summary()

    ten = export_lerobot(lake, str(tmp_path / "ten"), ExportConfig(fps=10))
    assert [(d.root, d.fps, d.episodes) for d in ten.datasets] == [(str(tmp_path / "ten"), 10, 2)]
    assert len(ten.skipped) == 2 and all("runs at 20 Hz, not the 10 Hz asked for" in s for s in ten.skipped)

    with pytest.raises(ExportError, match="not empty"):
        export_lerobot(lake, str(out))
    with pytest.raises(ExportError, match="no accepted episodes"):
        export_lerobot(lake, str(tmp_path / "none"), ExportConfig(where="dataset = 'nothing'"))
    with pytest.raises(ExportError, match="--where"):
        export_lerobot(lake, str(tmp_path / "bad"), ExportConfig(where="no_such_column = 1"))
