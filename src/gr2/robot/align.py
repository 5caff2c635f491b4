"""Multi-view alignment: every camera stream mapped onto the state stream's clock.

For each state step, each camera contributes its nearest frame once the camera's latency offset
is removed from its timestamps. The tolerance defaults to the farthest the nearest frame of the
camera's own on-time frames lies from any step (`gap_tolerance`), so anything farther means a frame
is missing (dropped, or the stream started late or stopped early). Such a step is flagged for that
view, never filled with a frame from the wrong time.

Offsets (camera clock minus state clock), first match wins: declared in the config, estimated
(the lag at which image motion best follows the end effector's motion), declared by the dataset's
own metadata (a calibrated rig), else none (0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from gr2.errors import Gr2Error
from gr2.robot.episode import Camera, Episode


class AlignmentError(Gr2Error):
    """A camera stream that cannot be put on the state clock; names the episode, camera and why."""


@dataclass(frozen=True)
class AlignConfig:
    tolerance_s: float | None = None  # None: from each camera's own timestamps (gap_tolerance)
    offsets_s: Mapping[str, float] = field(default_factory=dict)  # declared latency per camera
    # Cameras whose offset is estimated ("*": all without a declared one). Meant for static
    # cameras: a wrist camera's image motion follows its distance to the scene as much as its
    # speed, and on Meta-World's gripperPOV the estimate is confidently wrong (measured, 2026-11).
    estimate_cameras: tuple[str, ...] = ()
    estimated_s: Mapping[str, float] = field(default_factory=dict)  # estimated beforehand, pooled over episodes
    max_offset_s: float = 0.25  # estimation searches [-max, +max] (a peak on its edge is refused) ...
    resolution_s: float = 0.0025  # ... in steps this fine (then refines the peak)
    min_correlation: float = 0.5  # below: the estimate is refused, not guessed


@dataclass
class ViewAlignment:
    """One camera on the state clock: per step, the nearest frame, its skew and whether it counts."""

    camera: str
    frame_index: np.ndarray  # [T] int64, nearest frame
    frame_time_s: np.ndarray  # [T] that frame's time on the state clock
    skew_s: np.ndarray  # [T] frame time minus step time
    ok: np.ndarray  # [T] bool: within tolerance
    report: dict  # schema.ALIGNMENT_REPORT fields


@dataclass
class Alignment:
    views: list[ViewAlignment]
    steps: int  # T, the state clock's steps: an episode without cameras has steps and no views

    @property
    def flagged(self) -> np.ndarray:
        """[T] bool: steps where at least one view has no frame within tolerance (none without views)."""
        return ~np.logical_and.reduce([v.ok for v in self.views]) if self.views else np.zeros(self.steps, bool)

    @property
    def report(self) -> list[dict]:
        return [v.report for v in self.views]


def frame_period(timestamps_s: np.ndarray, fps: float | None = None) -> float:
    """The camera's frame period: from its declared rate, else the median frame interval."""
    if fps:
        return 1.0 / float(fps)
    if len(timestamps_s) < 2:
        raise ValueError("a camera with one frame and no declared rate has no period")
    return float(np.median(np.diff(timestamps_s)))


# A dropped frame makes an interval of about two periods; on-time jitter keeps one near a period.
GAP_PERIODS = 1.5  # so an interval this long or longer may hide a missing frame


def dropped_frames(timestamps_s: np.ndarray, period_s: float) -> np.ndarray:
    """[F-1] frames missing before each frame: gaps of more than 1.5 periods, counted in periods."""
    gaps = np.diff(np.asarray(timestamps_s, np.float64)) / period_s
    return np.where(gaps > GAP_PERIODS, np.round(gaps) - 1, 0).astype(np.int64)


def gap_tolerance(timestamps_s: np.ndarray, period_s: float) -> float:
    """Half the camera's longest on-time frame interval (at least half a period): flags gaps, not jitter."""
    # A step between two consecutive frames lies at most half their interval from the nearer one,
    # so a camera that keeps time puts every step within half its longest on-time interval of a
    # frame; a tighter tolerance flags jitter. Jitter here includes the state clock's own grain:
    # the Meta-World recorder (sim/record.py) captures only at a 12.5 ms env step, so its 15 Hz
    # camera's frames come 62.5 or 75 ms apart, not 66.7 (87.5 with its 3 ms jitter), and a step
    # mid-way between two is 37.5 ms from both: over half a period, with nothing missing. Intervals
    # of GAP_PERIODS or more are left out: they may hold a dropped frame, and a step at a dropped
    # frame's time is about a full period from its neighbours, so it stays flagged (the tolerance
    # stays under 0.75 period).
    intervals = np.diff(np.asarray(timestamps_s, np.float64))
    on_time = intervals[intervals < GAP_PERIODS * period_s]
    return 0.5 * max(period_s, float(on_time.max()) if len(on_time) else period_s)


def nearest_frames(step_times: np.ndarray, frame_times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest frame to each step, and frame time minus step time."""
    right = np.clip(np.searchsorted(frame_times, step_times), 1, len(frame_times) - 1) if len(frame_times) > 1 else np.zeros(len(step_times), np.int64)
    left = np.maximum(right - 1, 0)
    pick = np.where(np.abs(frame_times[left] - step_times) <= np.abs(frame_times[right] - step_times), left, right)
    return pick.astype(np.int64), frame_times[pick] - step_times


def align_camera(step_times: np.ndarray, camera: Camera, offset_s: float, offset_source: str,
                 tolerance_s: float | None = None) -> ViewAlignment:
    """Map one camera onto the state clock with a known offset."""
    try:
        period = frame_period(camera.timestamps_s, camera.fps)
    except ValueError as e:
        raise AlignmentError(f"camera {camera.name}: {e}") from None
    tol = gap_tolerance(camera.timestamps_s, period) if tolerance_s is None else float(tolerance_s)
    frame_times = np.asarray(camera.timestamps_s, np.float64) - offset_s
    idx, skew = nearest_frames(np.asarray(step_times, np.float64), frame_times)
    # A hair of slack so a frame exactly at the tolerance (float rounding) is not flagged.
    ok = np.abs(skew) <= tol + 1e-9
    good = np.abs(skew[ok])
    report = {
        "camera": camera.name,
        "fps": 1.0 / period,
        "frame_count": int(len(frame_times)),
        "offset_s": float(offset_s),
        "offset_source": offset_source,
        "tolerance_s": tol,
        "max_skew_s": float(good.max()) if len(good) else None,
        "mean_abs_skew_s": float(good.mean()) if len(good) else None,
        "dropped_frames": int(dropped_frames(camera.timestamps_s, period).sum()),
        "flagged_steps": int((~ok).sum()),
    }
    return ViewAlignment(camera.name, idx, frame_times[idx], skew, ok, report)


def motion_energy(frames: np.ndarray, times_s: np.ndarray, cell: int = 8) -> np.ndarray:
    """[F-1] image motion per second between consecutive frames.

    Frames are averaged over cell x cell blocks first: compression noise and texture cancel out,
    the motion of the arm stays.
    """
    n, h, w = frames.shape[:3]
    h, w = h - h % cell, w - w % cell
    grey = frames[:, :h, :w].astype(np.float32).mean(axis=-1)
    blocks = grey.reshape(n, h // cell, cell, w // cell, cell).mean(axis=(2, 4))
    return np.abs(np.diff(blocks, axis=0)).mean(axis=(1, 2)) / np.diff(times_s)


def lag_grid(max_offset_s: float, resolution_s: float) -> np.ndarray:
    return np.arange(-max_offset_s, max_offset_s + resolution_s / 2, resolution_s)


def offset_curve(episode: Episode, camera: str, lags: np.ndarray) -> np.ndarray:
    """Correlation, per candidate offset, of a camera's image motion with the end effector's motion.

    Between two consecutive frames the image changes about as much as the end effector moved
    between their capture times (camera time minus the offset): the true offset maximises the
    correlation. The state is interpolated at the frames' times, so frame and state rates need
    not match. NaN where too few frames overlap the state.
    """
    cam = episode.cameras[camera]
    if len(cam.frames) < 4:
        return np.full(len(lags), np.nan)
    frame_t = np.asarray(cam.timestamps_s, np.float64)
    frames = cam.frames.get(range(len(cam.frames)))
    cell = max(1, min(frames.shape[1:3]) // 16)
    motion = motion_energy(frames, frame_t, cell)
    x = episode.end_effector.pos if episode.end_effector is not None else np.asarray(episode.state, np.float64)
    scale = np.diff(x, axis=0).std(axis=0)
    x = x[:, scale > 0] / scale[scale > 0]
    t = np.asarray(episode.timestamps_s, np.float64)
    curve = np.full(len(lags), np.nan)
    for i, lag in enumerate(lags):
        at = frame_t - lag
        pos = np.stack([np.interp(at, t, x[:, d]) for d in range(x.shape[1])], axis=1)
        moved = np.linalg.norm(np.diff(pos, axis=0), axis=1) / np.diff(frame_t)
        inside = (at[:-1] >= t[0]) & (at[1:] <= t[-1])
        a, b = motion[inside], moved[inside]
        if inside.sum() >= 4 and a.std() > 0 and b.std() > 0:
            curve[i] = float(np.corrcoef(a, b)[0, 1])
    return curve


@dataclass(frozen=True)
class OffsetEstimate:
    """The peak of a correlation curve over candidate offsets."""

    offset_s: float
    correlation: float
    at_edge: bool  # the peak is the first or last offset the curve has: the true one may lie beyond


def pick_offset(curves: list[np.ndarray], lags: np.ndarray) -> OffsetEstimate:
    """The peak of the mean of per-episode curves, refined by a parabola.

    Averaging curves pools episodes: a rig's latency is the same in all of them, and one short
    episode rarely pins it down alone.
    """
    stacked = np.asarray(curves, np.float64).reshape(-1, len(lags))
    mean = _nanmean(stacked)
    searched = np.flatnonzero(np.isfinite(mean))
    if not len(searched):
        return OffsetEstimate(0.0, float("nan"), False)
    mean = np.where(np.isfinite(mean), mean, -np.inf)
    best = int(np.argmax(mean))
    offset = float(lags[best])
    if 0 < best < len(lags) - 1 and np.isfinite(mean[best - 1]) and np.isfinite(mean[best + 1]):
        y0, y1, y2 = mean[best - 1], mean[best], mean[best + 1]
        denom = y0 - 2 * y1 + y2
        if denom < 0:
            offset += 0.5 * (y0 - y2) / denom * float(lags[1] - lags[0])
    return OffsetEstimate(offset, float(mean[best]), best in (searched[0], searched[-1]))


def _nanmean(stacked: np.ndarray) -> np.ndarray:
    counts = np.isfinite(stacked).sum(axis=0)
    sums = np.where(np.isfinite(stacked), stacked, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def estimation_grid(config: AlignConfig) -> np.ndarray:
    """Candidate offsets: one grid for every episode, so their curves can be pooled."""
    return lag_grid(config.max_offset_s, config.resolution_s)


def estimate_offsets(episodes: list[Episode], cameras: list[str], config: AlignConfig = AlignConfig()) -> dict[str, float]:
    """One offset per camera from several episodes of one rig; AlignmentError when one cannot be had."""
    out = {}
    for name in cameras:
        have = [e for e in episodes if name in e.cameras]
        if not have:
            raise AlignmentError(f"camera {name}: no episode has it, so its offset cannot be estimated")
        lags = estimation_grid(config)
        estimate = pick_offset([offset_curve(e, name, lags) for e in have], lags)
        out[name] = accept_offset(estimate, config, f"camera {name} over {len(have)} episodes")
    return out


def accept_offset(estimate: OffsetEstimate, config: AlignConfig, what: str) -> float:
    """The estimated offset, or AlignmentError saying why the data cannot support it."""
    if estimate.at_edge:
        # Checked first: a curve still rising where the search stopped has not reached its peak, so
        # its correlation there says nothing about how well motion would match at the true offset.
        why = (f"the best match ({estimate.offset_s:+.3f} s, correlation {estimate.correlation:.2f}) is at the edge "
               f"of the offsets searched, so the latency may lie beyond it (widen max_offset_s, now {config.max_offset_s} s)")
    elif not estimate.correlation >= config.min_correlation:
        why = (f"image motion does not follow the end effector (best correlation "
               f"{estimate.correlation:.2f} < {config.min_correlation})")
    else:
        return estimate.offset_s
    raise AlignmentError(f"{what}: cannot estimate the offset: {why}; declare the offset instead")


def align(episode: Episode, config: AlignConfig = AlignConfig(), cameras: list[str] | None = None) -> Alignment:
    """Every camera of `episode` (or those named) on the state clock."""
    views = []
    step_times = np.asarray(episode.timestamps_s, np.float64)
    for name in cameras or sorted(episode.cameras):
        if name not in episode.cameras:
            raise AlignmentError(f"{episode.ref.uri}: camera {name} missing")
        cam = episode.cameras[name]
        if name in config.offsets_s:
            offset, source = float(config.offsets_s[name]), "declared"
        elif name in config.estimated_s:
            offset, source = float(config.estimated_s[name]), "estimated"
        elif name in config.estimate_cameras or "*" in config.estimate_cameras:
            offset, source = _estimate(episode, cam, config), "estimated"
        elif cam.offset_s is not None:
            offset, source = float(cam.offset_s), "dataset"
        else:
            offset, source = 0.0, "none"
        views.append(align_camera(step_times, cam, offset, source, config.tolerance_s))
    return Alignment(views, len(step_times))


def _estimate(episode: Episode, cam: Camera, config: AlignConfig) -> float:
    lags = estimation_grid(config)
    estimate = pick_offset([offset_curve(episode, cam.name, lags)], lags)
    return accept_offset(estimate, config, f"{episode.ref.uri}: camera {cam.name}")
