"""Shots: find where one shot ends and the next begins, hard cut or gradual transition, then window
each shot into candidate clips.

A transition is a [start, end) span of frames that belong to neither shot: empty at a hard cut
(`(c, c)`, c the new shot's first frame), the blended frames of a dissolve, fade or wipe. Clips are
windowed between transitions, so none holds a transition frame or frames of two shots.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from gr2.video.config import BuildConfig

THUMB_SIZE = (16, 9)  # frames for the gradual detector: every frame is kept, so they are tiny
CHANGED_PIXEL = 20.0  # mean abs difference (0..255) that makes a pixel "changed"
# A gradual transition replaces most of the picture; a hand or a car crossing it does not.
CHANGED_FRACTION = 0.7
# Frames whose distance from the old shot is under this fraction of the way to the new one (or the
# reverse) belong to that shot; the rest are blends. Low, so faint blends are excluded too.
SHOT_LIKE = 0.05

Span = tuple[int, int]


def find_transitions(chunks: Iterable[tuple[int, np.ndarray]], fps: float,
                     config: BuildConfig) -> tuple[int, list[Span]]:
    """(frame count, transition spans) of a video given chunk by chunk as small RGB frames."""
    # Hard cuts: PySceneDetect's AdaptiveDetector, fed the frames the survey already decodes. It
    # compares adjacent frames only, so it misses dissolves, fades and wipes: gradual_transitions.
    from scenedetect import FrameTimecode  # with OpenCV, ~1 s to import: only the survey pays it
    from scenedetect.detectors import AdaptiveDetector

    # min_scene_len=1: every cut is wanted, however short the shot; a flash gets a cut on each side,
    # which leaves its frames a shot too short to become a clip.
    detector = AdaptiveDetector(adaptive_threshold=config.cut_threshold, min_content_val=config.cut_min_change,
                                min_scene_len=1)
    cuts, thumbs, count, fps = [], [], 0, float(fps)
    for start, frames in chunks:
        for i, frame in enumerate(frames):
            # PySceneDetect expects OpenCV's BGR order
            cuts += detector.process_frame(FrameTimecode(start + i, fps=fps), np.ascontiguousarray(frame[..., ::-1]))
        thumbs.append(thumbnails(frames))
        count = start + len(frames)
    if count:
        cuts += detector.post_process(FrameTimecode(count - 1, fps=fps))
    gradual = gradual_transitions(np.concatenate(thumbs), fps, config) if thumbs else []
    return count, merge_spans([(c.frame_num, c.frame_num) for c in cuts] + gradual)


def thumbnails(frames: np.ndarray) -> np.ndarray:
    """[N, 9, 16, 3] uint8 area-averaged thumbnails of [N, H, W, 3] frames."""
    import cv2

    return np.stack([cv2.resize(f, THUMB_SIZE, interpolation=cv2.INTER_AREA) for f in frames])


def gradual_transitions(thumbs: np.ndarray, fps: float, config: BuildConfig) -> list[Span]:
    """Spans where most of the picture changes across a window, far more than just before and after."""
    # PySceneDetect has no such detector (its ThresholdDetector sees only fades to a fixed level),
    # so this is ours: AdaptiveDetector's rolling ratio applied to frames 2w apart instead of
    # adjacent ones, at half-widths w doubling up to transition_max_s. It finds cuts too.
    spans, settled = [], []
    for w in half_widths(fps, config.transition_max_s):
        change, changed = window_change(thumbs, w)
        # the windows just before and after, each 2w away; where neither exists nothing stands out
        pair = np.stack([_shift(change, 2 * w), _shift(change, -2 * w)])
        seen = (~np.isnan(pair)).sum(axis=0)
        around = np.where(seen > 0, np.nansum(pair, axis=0) / np.maximum(seen, 1), np.inf)
        hit = (change >= config.transition_min_change) & (changed >= CHANGED_FRACTION) \
            & (change >= config.transition_ratio * np.maximum(around, 1.0))
        for t in _middles(hit):
            span, whole = locate(thumbs, t - w, t + w)
            # A hard cut found whole at a smaller scale is placed best there: a wider window reaches
            # deeper into the shots around it, whose own motion would stretch the cut into a span.
            # Gradual spans all stay: a fade's first half found alone is not the whole fade.
            if not any(_overlap(span, s) for s in settled):
                spans.append(span)
                if whole and span[0] == span[1]:
                    settled.append(span)
    return spans


def _overlap(x: Span, y: Span) -> bool:
    """Whether two spans share a frame, an empty (hard cut) span counting as its frame."""
    return x[0] < max(y[1], y[0] + 1) and y[0] < max(x[1], x[0] + 1)


def half_widths(fps: float, max_s: float) -> list[int]:
    """Window half-widths in frames: 2, 4, 8, ... until a window spans `max_s` seconds."""
    out, w = [], 2
    while not out or 2 * out[-1] < max_s * fps:
        out.append(w)
        w *= 2
    return out


def window_change(thumbs: np.ndarray, w: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per frame t: mean abs difference (0..255) of frames t-w and t+w, and the fraction of pixels changed."""
    n = len(thumbs)
    change, changed = np.full(n, np.nan, np.float32), np.zeros(n, np.float32)
    for lo in range(w, n - w, block):  # in blocks: an hour of frames would be GBs as one array
        hi = min(lo + block, n - w)
        d = np.abs(thumbs[lo + w:hi + w].astype(np.int16) - thumbs[lo - w:hi - w]).mean(axis=-1)
        change[lo:hi] = d.mean(axis=(1, 2))
        changed[lo:hi] = (d > CHANGED_PIXEL).mean(axis=(1, 2))
    return change, changed


def _shift(x: np.ndarray, k: int) -> np.ndarray:
    """`x` moved `k` places later (earlier when negative), NaN where nothing moved in."""
    out = np.full_like(x, np.nan)
    if abs(k) < len(x):
        if k >= 0:
            out[k:] = x[:len(x) - k]
        else:
            out[:k] = x[-k:]
    return out


def _middles(hit: np.ndarray) -> list[int]:
    """The middle index of each run of consecutive `hit`s."""
    # the window most centred on what it hit: every window holding a whole transition changes as
    # much, so the largest change is no guide
    idx = np.flatnonzero(hit)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []
    return [int(r[len(r) // 2]) for r in runs]


def locate(thumbs: np.ndarray, lo: int, hi: int) -> tuple[Span, bool]:
    """The transition between frames `lo` (old shot) and `hi` (new shot), and whether it was found whole."""
    # Found against the window's end frames, then again against frames just outside what was
    # found, until it holds: motion in a shot moves its frames away from a far reference, and
    # would otherwise count as part of the transition.
    first, last = lo, hi
    for _ in range(4):
        a, b = blend_span(thumbs[lo:hi + 1], lo)
        # references half the span's length outside it (inside the window still): near enough that
        # motion barely moves them, far enough that they are not the faint first and last blends
        pad = max(2, (b - a) // 2)
        near = (max(first, a - 1 - pad), min(last, b + pad))
        if near == (lo, hi):
            break
        lo, hi = near
    return (a, b), settled_ends(thumbs, lo, hi, b - a)


def settled_ends(thumbs: np.ndarray, lo: int, hi: int, length: int) -> bool:
    """Whether frames `lo` and `hi` sit in steady shots, not amid a longer transition."""
    # Each must differ from its outer neighbour less than half as much as the picture changes per
    # frame across the `length` frames between them; inside a longer dissolve it changes as fast.
    f = thumbs[[max(lo - 1, 0), lo, hi, min(hi + 1, len(thumbs) - 1)]].astype(np.float32)
    steps = max(np.abs(f[1] - f[0]).mean(), np.abs(f[3] - f[2]).mean())
    return bool(steps < 0.5 * np.abs(f[2] - f[1]).mean() / max(1, length + 1))


def blend_span(window: np.ndarray, first: int) -> Span:
    """The frames of `window` (numbered from `first`) like neither its first frame nor its last."""
    f = window.astype(np.float32)
    to_old = np.abs(f - f[0]).mean(axis=(1, 2, 3))
    to_new = np.abs(f - f[-1]).mean(axis=(1, 2, 3))
    steps = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))
    if steps.size and steps.max() >= 0.5 * max(to_old.max(), to_new.max()):
        # one step makes most of the way from one end to the other: a hard cut, whatever the
        # motion on either side (a fade through black goes further, to black and back, in many)
        cut = first + int(np.argmax(steps)) + 1
        return cut, cut
    # 0 at the old shot, 1 at the new, in between for blends and for the black of a fade
    progress = to_old / np.maximum(to_old + to_new, 1e-6)
    start = int(np.argmax(progress > SHOT_LIKE))
    end = int(np.flatnonzero(progress < 1 - SHOT_LIKE)[-1]) + 1
    if end <= start:  # a hard cut: old-shot frames, then new-shot frames
        end = start
    return first + start, first + end


def merge_spans(spans: list[Span]) -> list[Span]:
    """Sorted spans with overlapping or touching ones joined."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def shot_spans(frame_count: int, transitions: list[Span]) -> list[Span]:
    """[start, end) frame spans of the shots between transitions."""
    out, start = [], 0
    for a, b in merge_spans([(max(0, a), min(frame_count, b)) for a, b in transitions]):
        if a > start:
            out.append((start, a))
        start = max(start, b)
    if frame_count > start:
        out.append((start, frame_count))
    return out


def windows(shots: list[Span], fps: float, clip_s: float, margin_frames: int,
            frame_count: int | None = None) -> list[tuple[int, int, int]]:
    """(shot_index, start, end) candidate clips of `clip_s` seconds inside each shot.

    `margin_frames` are dropped at each end of a shot that touches a transition, where half-decoded
    frames and the faintest blends live. A shot too short for one window still yields one
    candidate (its whole usable span), so the duration gate can reject it with a reason instead of
    it vanishing. `frame_count` defaults to where the last shot ends.
    """
    length = max(1, int(round(clip_s * fps)))
    out = []
    total = frame_count if frame_count is not None else (shots[-1][1] if shots else 0)
    for k, (a, b) in enumerate(shots):
        start = a + (margin_frames if a > 0 else 0)
        end = b - (margin_frames if b < total else 0)
        if end <= start:
            continue
        n = (end - start) // length
        if n == 0:
            out.append((k, start, end))
        out.extend((k, start + j * length, start + (j + 1) * length) for j in range(n))
    return out


def sample_indices(start: int, end: int, n: int) -> list[int]:
    """`n` frame indices spread evenly over [start, end) (fewer when the span is shorter)."""
    n = max(1, min(n, end - start))
    return np.linspace(start, end - 1, n).round().astype(int).tolist()
