"""Alignment on synthetic streams whose truth is known: rates, latencies, jitter and drops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from gr2.robot.align import AlignConfig, AlignmentError, align, estimate_offsets
from gr2.robot.episode import ArrayFrames, Camera, EndEffector, Episode, EpisodeRef


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


def test_every_aligned_frame_is_within_half_a_period_of_its_step():
    episode, truth = synthetic_episode(seed=1)
    result = align(episode, declared(truth))
    for view in result.views:
        cam = truth[view.camera]
        true_time = cam.capture_s[view.frame_index]
        skew = np.abs(true_time - episode.timestamps_s)[view.ok]
        assert view.ok.mean() > 0.8
        assert skew.max() <= 0.5 / cam.fps + 1e-9
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
    assert wrong.report["max_skew_s"] <= 0.5 / 30 + 1e-9


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
