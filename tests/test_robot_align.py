"""Alignment on synthetic streams whose truth is known: rates, latencies, jitter and drops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from gr2.robot.align import AlignConfig, AlignmentError, align, estimate_offsets
from gr2.robot.episode import ArrayFrames, Camera, EndEffector, Episode, EpisodeRef
from gr2.sim.record import RecordConfig, capture_schedule, choose_drops

DT = 0.0125  # the Meta-World recorder's env step: its cameras capture only on one


@dataclass
class CamTruth:
    fps: float
    offset_s: float
    capture_s: np.ndarray  # true capture time of every kept frame (state clock)
    dropped_s: np.ndarray  # true capture times of the dropped frames


def _trajectory(t: np.ndarray, phase: float) -> np.ndarray:
    """End-effector x in [0.1, 0.9], with a speed that varies (so image motion has a shape)."""
    return 0.5 + 0.25 * np.sin(2 * np.pi * 0.4 * t + phase) + 0.12 * np.sin(2 * np.pi * 1.3 * t + 2 * phase)


def _render(x: np.ndarray, size: int = 64) -> np.ndarray:
    """A soft bright blob whose column follows x: image motion proportional to end-effector motion."""
    cols = np.arange(size)[None, :]
    centre = 8 + (size - 16) * x[:, None]
    row = 40 + 200 * np.exp(-0.5 * ((cols - centre) / 3.0) ** 2)
    return np.repeat(np.repeat(row[:, None, :, None], size, axis=1), 3, axis=3).astype(np.uint8)


def synthetic_episode(seed: int = 0, state_hz: float = 50.0, duration_s: float = 4.0,
                      cams: dict[str, tuple[float, float]] | None = None, drops: int = 3,
                      jitter_s: float = 0.001, flat: bool = False) -> tuple[Episode, dict[str, CamTruth]]:
    """An episode with cameras {name: (fps, latency)}; frames render the state at their capture time."""
    rng = np.random.default_rng(seed)
    cams = cams or {"head": (15.0, 0.040), "wrist": (30.0, 0.012)}
    phase = rng.uniform(0, 2 * np.pi)
    t = np.arange(0, duration_s, 1 / state_hz)
    x = _trajectory(t, phase)
    pos = np.c_[x, np.zeros_like(x), np.zeros_like(x)]
    quat = np.tile([0.0, 0.0, 0.0, 1.0], (len(t), 1))
    cameras, truth = {}, {}
    for name, (fps, offset) in cams.items():
        nominal = np.arange(0, duration_s, 1 / fps) + rng.uniform(0, 1 / fps)
        capture = np.sort(nominal + rng.normal(0, jitter_s, len(nominal)))
        capture = capture[capture < t[-1]]
        dropped = rng.choice(np.arange(2, len(capture) - 2), size=drops, replace=False) if drops else np.array([], int)
        keep = np.setdiff1d(np.arange(len(capture)), dropped)
        frames = _render(np.full(len(keep), 0.5) if flat else _trajectory(capture[keep], phase))
        cameras[name] = Camera(name, capture[keep] + offset, ArrayFrames(frames), fps)
        truth[name] = CamTruth(fps, offset, capture[keep], np.sort(capture[dropped]))
    ref = EpisodeRef("synthetic", "mem://synthetic", f"episode_{seed}", tuple(cams))
    episode = Episode(ref, "follow the blob", t, pos, np.zeros((len(t), 1)), cameras,
                      EndEffector(pos, quat, np.zeros((len(t), 1))))
    return episode, truth


def declared(truth: dict[str, CamTruth]) -> AlignConfig:
    return AlignConfig(offsets_s={name: c.offset_s for name, c in truth.items()})


def test_every_aligned_frame_is_within_a_jitter_sized_tolerance_of_its_step():
    episode, truth = synthetic_episode(seed=1)
    result = align(episode, declared(truth))
    for view in result.views:
        cam = truth[view.camera]
        true_time = cam.capture_s[view.frame_index]
        skew = np.abs(true_time - episode.timestamps_s)[view.ok]
        assert view.ok.mean() > 0.8
        # Half a period, widened by what the 1 ms capture jitter stretches an interval to.
        tolerance = view.report["tolerance_s"]
        assert 0.5 / cam.fps <= tolerance < 0.5 / cam.fps + 0.003
        assert skew.max() <= tolerance + 1e-9
        assert view.report["offset_source"] == "declared" and view.report["offset_s"] == cam.offset_s
        # The nearest frame, measured on the true clock, is the one chosen.
        nearest = np.abs(cam.capture_s[None, :] - episode.timestamps_s[:, None]).argmin(axis=1)
        np.testing.assert_array_equal(view.frame_index[view.ok], nearest[view.ok])


def test_every_dropped_frame_is_flagged_and_counted():
    episode, truth = synthetic_episode(seed=2, drops=4)
    result = align(episode, declared(truth))
    for view in result.views:
        cam = truth[view.camera]
        assert view.report["dropped_frames"] == 4
        for when in cam.dropped_s:
            step = int(np.abs(episode.timestamps_s - when).argmin())
            assert not view.ok[step], f"{view.camera}: the step at a dropped frame ({when:.3f}s) was not flagged"
        assert view.report["flagged_steps"] == int((~view.ok).sum()) > 0
    assert result.flagged.sum() == np.logical_or.reduce([~v.ok for v in result.views]).sum()



def test_an_episode_without_cameras_has_every_step_and_none_flagged():
    import dataclasses

    episode, _ = synthetic_episode(seed=2)
    result = align(dataclasses.replace(episode, cameras={}))
    # [T], not [0]: the ingest's flagged fraction is a mean over the steps (numpy warned on an empty one)
    assert result.views == [] and result.flagged.shape == (episode.length,) and not result.flagged.any()

def test_ignoring_a_latency_picks_frames_from_the_wrong_time():
    episode, truth = synthetic_episode(seed=3, cams={"head": (30.0, 0.050)}, drops=0)
    right = align(episode, declared(truth)).views[0]
    wrong = align(episode, AlignConfig()).views[0]
    assert wrong.report["offset_source"] == "none"
    # Stamped 50 ms late at 30 fps: uncorrected, every step gets a frame captured ~1.5 frames too early,
    # though on the camera's own stamps it looks on time.
    assert (wrong.frame_index != right.frame_index).mean() > 0.9
    true_skew = truth["head"].capture_s[wrong.frame_index] - episode.timestamps_s
    assert abs(np.median(true_skew) + 0.050) < 0.017
    assert wrong.report["max_skew_s"] <= wrong.report["tolerance_s"] < 0.5 / 30 + 0.003


def test_a_camera_that_stops_early_flags_the_steps_after_it():
    episode, truth = synthetic_episode(seed=4, cams={"head": (15.0, 0.0)}, drops=0)
    cam = episode.cameras["head"]
    keep = cam.timestamps_s < 2.0
    episode.cameras["head"] = Camera("head", cam.timestamps_s[keep], ArrayFrames(cam.frames.array[keep]), 15.0)
    view = align(episode, declared(truth)).views[0]
    late = episode.timestamps_s > cam.timestamps_s[keep][-1] + 0.5 / 15 + 1e-6
    assert late.any() and not view.ok[late].any() and view.ok[~late].mean() > 0.9


def test_a_tolerance_can_be_declared():
    episode, truth = synthetic_episode(seed=5, drops=0)
    strict = align(episode, AlignConfig(offsets_s=declared(truth).offsets_s, tolerance_s=0.002))
    assert all(v.report["tolerance_s"] == 0.002 for v in strict.views)
    assert strict.flagged.mean() > 0.5


def test_latency_is_estimated_from_image_motion_pooled_over_episodes():
    cams = {"head": (15.0, 0.045), "wrist": (30.0, -0.020)}
    episodes = [synthetic_episode(seed=s, cams=cams, drops=2)[0] for s in range(10, 13)]
    found = estimate_offsets(episodes, list(cams), AlignConfig())
    for name, (_, offset) in cams.items():
        assert abs(found[name] - offset) < 0.005, (name, found[name], offset)
    # Per episode too, through align() with the camera marked for estimation.
    result = align(episodes[0], AlignConfig(estimate_cameras=("*",)))
    for view in result.views:
        assert view.report["offset_source"] == "estimated"
        assert abs(view.report["offset_s"] - cams[view.camera][1]) < 0.5 / cams[view.camera][0]


def test_a_video_without_motion_refuses_an_estimate_instead_of_guessing():
    episode, _ = synthetic_episode(seed=6, cams={"head": (15.0, 0.03)}, flat=True)
    with pytest.raises(AlignmentError, match=r"camera head: cannot estimate the offset.*declare the offset"):
        align(episode, AlignConfig(estimate_cameras=("head",)))


def recorder_schedule_episode(seed: int, drops: int = 0) -> tuple[Episode, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """An episode stamped on the Meta-World recorder's own capture schedule (sim/record.py): its
    cameras' rates, phases, jitter and snap to the env step; {camera: (kept, dropped steps)}."""
    rng = np.random.default_rng(seed)
    length = int(rng.integers(60, 201))
    cameras, steps = {}, {}
    for spec in RecordConfig().cameras:
        captured, _ = capture_schedule(spec, DT, length, rng)
        dropped = choose_drops(len(captured), drops, rng)
        kept = np.delete(captured, dropped)
        frames = ArrayFrames(np.zeros((len(kept), 4, 4, 3), np.uint8))
        cameras[spec.name] = Camera(spec.name, kept * DT + spec.offset_s, frames, spec.fps, spec.offset_s)
        steps[spec.name] = (kept, captured[dropped])
    t = np.arange(length) * DT
    ref = EpisodeRef("schedule", "mem://schedule", f"episode_{seed}", tuple(cameras))
    return Episode(ref, "", t, np.zeros((length, 1)), np.zeros((length, 1)), cameras), steps


def interval_around(frames: np.ndarray, step: int) -> float:
    """Seconds between the kept frames on either side of `step` (env steps, inside the stream)."""
    i = np.searchsorted(frames, step)
    return float(frames[i] - frames[i - 1]) * DT


def test_on_time_frames_on_the_recorders_schedule_are_not_flagged():
    flagged = steps = 0
    for seed in range(40):
        episode, kept = recorder_schedule_episode(seed)
        for view in align(episode).views:
            frames = kept[view.camera][0]
            period = 1 / episode.cameras[view.camera].fps
            inside = np.arange(frames[0], frames[-1] + 1)  # steps between the first and the last frame
            for step in inside[~view.ok[inside]]:
                # Only where frames are 1.5 periods or more apart (a dropped frame's gap, to the eye of
                # the timestamps) may a step between them be flagged.
                gap = interval_around(frames, step)
                assert gap >= 1.5 * period - 1e-9, f"seed {seed}: {view.camera} step {step} flagged in a {gap * 1000:.1f} ms interval"
            flagged += int((~view.ok[inside]).sum())
            steps += len(inside)
            assert 0.5 * period <= view.report["tolerance_s"] < 0.75 * period
    assert flagged / steps < 0.001, f"{flagged} of {steps} on-time steps flagged"


def test_every_dropped_frame_is_flagged_on_the_recorders_schedule():
    checked = 0
    for seed in range(40):
        episode, kept = recorder_schedule_episode(seed, drops=2)
        for view in align(episode).views:
            frames, dropped = kept[view.camera]
            period = 1 / episode.cameras[view.camera].fps
            # A drop that leaves a gap under 1.5 periods looks like jitter to any rule reading timestamps.
            for step in dropped[[interval_around(frames, s) >= 1.5 * period for s in dropped]]:
                assert not view.ok[step], f"seed {seed}: {view.camera} step {step}, a dropped frame's, is not flagged"
                checked += 1
    assert checked >= 150  # of the 160 dropped


def test_an_estimate_that_peaks_at_the_edge_of_its_search_is_refused():
    # A 120 ms latency searched only within +-50 ms: the best the search can find is its edge.
    cams = {"head": (15.0, 0.120)}
    episodes = [synthetic_episode(seed=s, cams=cams, drops=0)[0] for s in range(20, 23)]
    config = AlignConfig(max_offset_s=0.05)
    with pytest.raises(AlignmentError, match=r"camera head over 3 episodes: cannot estimate the offset: the best "
                                             r"match \(\+0\.050 s, correlation 0\.\d\d\) is at the edge of the offsets searched"):
        estimate_offsets(episodes, ["head"], config)
    with pytest.raises(AlignmentError, match=r"camera head: cannot estimate the offset: .*edge.*max_offset_s"):
        align(episodes[0], AlignConfig(max_offset_s=0.05, estimate_cameras=("head",)))
    # Searched wide enough, the same episodes give the latency.
    assert abs(estimate_offsets(episodes, ["head"], AlignConfig(max_offset_s=0.2))["head"] - 0.120) < 0.005
