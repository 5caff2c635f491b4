"""Meta-World experts recorded with imperfect camera clocks, aligned against the recorded truth,
then ingested into a lake through Ray (twice: the second run adds nothing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from gr2.lake.lake import Lake
from gr2.robot import lerobot
from gr2.robot.actions import stats_uri
from gr2.robot.align import AlignConfig, align, estimate_offsets
from gr2.robot.episode import decode_jpeg
from gr2.robot.ingest import IngestConfig, ingest
from gr2.sim.record import RecordConfig, record, truth


@pytest.fixture(scope="session")
def recorded(tmp_path_factory, ray_local) -> str:
    """Two drawer-open episodes, corner at 20 Hz (+30 ms) and gripperPOV at 15 Hz (+55 ms), 2 drops each.

    With Ray up, each episode renders in a worker process of its own: osmesa never enters the
    test process, where torch's compiler stack would segfault beside it (DESIGN.md).
    """
    out = str(tmp_path_factory.mktemp("metaworld") / "drawer")
    record(out, RecordConfig(tasks=("drawer-open-v3",), episodes=2, seed=0))
    return out


@pytest.fixture(scope="session")
def episodes(recorded):
    return [lerobot.load_episode(r) for r in lerobot.list_episodes(recorded)]


def test_the_recording_is_a_lerobot_dataset_that_carries_its_truth(recorded):
    info = json.load(open(f"{recorded}/meta/info.json"))
    assert info["codebase_version"] == "v2.1" and info["total_episodes"] == 2
    t = truth(recorded)
    assert {n: (c["fps"], c["offset_s"]) for n, c in t["cameras"].items()} == {"corner": (20.0, 0.03), "gripperPOV": (15.0, 0.055)}
    for ep in t["episodes"]:
        assert ep["success"] and ep["length"] <= 200
        for cam in ep["cameras"].values():
            assert len(cam["dropped_capture_step"]) == 2 and np.all(np.diff(cam["capture_step"]) > 0)


def test_views_align_within_the_jitter_tolerance_of_the_true_capture_and_only_gaps_are_flagged(episodes, recorded):
    t = truth(recorded)
    dt = t["control_dt_s"]
    for ep, ep_truth in zip(episodes, t["episodes"]):
        result = align(ep)  # the latencies the dataset declares
        for view in result.views:
            cam = ep_truth["cameras"][view.camera]
            period = 1.0 / t["cameras"][view.camera]["fps"]
            assert view.report["offset_source"] == "dataset"
            true_time = np.asarray(cam["capture_step"])[view.frame_index] * dt
            skew = np.abs(true_time - ep.timestamps_s)
            # Captures snap to the 12.5 ms env step: on-time frames come up to 1.5 periods apart.
            tolerance = view.report["tolerance_s"]
            assert period / 2 <= tolerance < 0.75 * period
            assert skew[view.ok].max() <= tolerance + 1e-6
            assert view.ok.mean() > 0.6
            # Between the first and last frame, a step is flagged only inside a dropped frame's gap.
            kept = np.asarray(cam["capture_step"])
            for step in np.flatnonzero(~view.ok):
                if kept[0] < step < kept[-1]:
                    i = np.searchsorted(kept, step)
                    assert (kept[i] - kept[i - 1]) * dt >= 1.5 * period, f"{view.camera}: on-time step {step} flagged"


def test_every_dropped_frame_is_flagged(episodes, recorded):
    t = truth(recorded)
    for ep, ep_truth in zip(episodes, t["episodes"]):
        for view in align(ep).views:
            dropped = ep_truth["cameras"][view.camera]["dropped_capture_step"]
            assert view.report["dropped_frames"] == len(dropped)
            for step in dropped:
                assert not view.ok[step], f"{view.camera}: step {step}, where a frame was dropped, is not flagged"


def test_the_static_cameras_latency_is_recovered_by_estimation(episodes, recorded):
    found = estimate_offsets(episodes, ["corner"], AlignConfig())
    assert abs(found["corner"] - 0.030) < 0.5 / 20  # within half the corner camera's frame period


def test_ingest_is_accounted_for_and_reingest_adds_nothing(ray_local, recorded, tmp_path):
    broken = shutil.copytree(recorded, tmp_path / "broken")
    (broken / "videos/chunk-000/observation.images.corner/episode_000001.mp4").write_bytes(b"not a video")
    lake = Lake(str(tmp_path / "lake"))
    config = IngestConfig(max_step_hz=20.0)

    first = ingest([recorded, str(broken)], lake, config)
    f = first.funnel
    assert (f["episodes"], f["accepted"], f["rejected"], f["failed"]) == (4, 3, 0, 1)
    assert f["episodes"] == f["accepted"] + f["rejected"] + f["failed"]
    assert any("episode_000001: camera corner: unreadable video" in r for r in first.reasons)
    episodes = lake.read("episodes")
    assert episodes.num_rows == 3 and f["duplicates"] == 1  # the broken copy's good episode: same content, one id
    steps = lake.read("steps")
    accepted = episodes.filter(pc.equal(episodes["status"], "accepted"))
    assert steps.num_rows == f["steps_added"] == sum(accepted.column("length").to_pylist())
    row = accepted.to_pylist()[0]
    assert row["cameras"] == ["corner", "gripperPOV"] and row["action_space"] == "ee_delta" and row["state_fps"] == pytest.approx(20, rel=1e-3)
    assert {a["camera"]: a["offset_source"] for a in row["alignment"]} == {"corner": "dataset", "gripperPOV": "dataset"}
    view = steps.column("views")[5].as_py()[0]
    assert view["ok"] and decode_jpeg(view["jpeg"]).shape == (128, 128, 3) and view["tokens"] is None
    stats = json.loads(Path(stats_uri(lake.root, "drawer")).read_text())
    assert stats["episodes"] == 2 and len(stats["action"]["q99"]) == 7

    versions = {t: lake.dataset(t).version for t in ("steps",)}
    second = ingest([recorded, str(broken)], lake, config)
    assert second.funnel["already_in_lake"] == 3 and second.funnel["steps_added"] == 0
    assert second.funnel["accepted"] == 3 and second.funnel["failed"] == 1
    assert lake.read("episodes").num_rows == 3 and lake.read("steps").num_rows == steps.num_rows
    assert lake.dataset("steps").version == versions["steps"]  # nothing was even merged


def test_ingest_estimates_a_static_cameras_latency_per_source_or_fails_its_episodes(ray_local, recorded, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    out = ingest([recorded], lake, IngestConfig(estimate_cameras=("corner",)))
    estimated = out.funnel["offsets_estimated"][recorded]["corner"]
    assert abs(estimated - 0.030) < 0.5 / 20 and out.funnel["accepted"] == 2
    for row in lake.read("episodes").to_pylist():
        sources = {a["camera"]: (a["offset_source"], a["offset_s"]) for a in row["alignment"]}
        assert sources["corner"] == ("estimated", estimated) and sources["gripperPOV"] == ("dataset", 0.055)

    # An estimate the data cannot support is refused, and the source's episodes fail saying why.
    strict = ingest([recorded], Lake(str(tmp_path / "strict")), IngestConfig(estimate_cameras=("corner",), min_correlation=0.99))
    assert strict.funnel["failed"] == 2 and strict.funnel["accepted"] == 0
    assert all("camera corner over 2 episodes: cannot estimate the offset" in r for r in strict.reasons)


def test_an_estimate_at_the_edge_of_its_search_fails_the_sources_episodes_saying_so(ray_local, recorded, tmp_path):
    # The corner camera's 30 ms latency, searched within +-10 ms only: the peak is the search's edge.
    out = ingest([recorded], Lake(str(tmp_path / "lake")), IngestConfig(estimate_cameras=("corner",), max_offset_s=0.01))
    assert out.funnel["failed"] == 2 and out.funnel["accepted"] == 0 and not out.funnel["offsets_estimated"]
    for row in Lake(str(tmp_path / "lake")).read("episodes").to_pylist():
        assert "camera corner over 2 episodes: cannot estimate the offset: the best match (+0.010 s" in row["reason"]
        assert "is at the edge of the offsets searched" in row["reason"]
        assert "widen max_offset_s" in row["reason"]
