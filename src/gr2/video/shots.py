"""Shots: cut a video where frame content jumps, then window each shot into candidate clips."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def frame_differences(chunks: Iterable[tuple[int, np.ndarray]]) -> np.ndarray:
    """Mean absolute difference (0..255) between each frame and the one before; [0] is 0.

    Takes the frames chunk by chunk (small, e.g. 48x27) so a long video never sits in memory.
    """
    diffs, prev = [], None
    for _, frames in chunks:
        f = frames.astype(np.int16)
        if prev is not None:
            diffs.append(np.abs(f[0] - prev).mean())
        else:
            diffs.append(0.0)
        diffs.extend(np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3)).tolist())
        prev = f[-1]
    return np.asarray(diffs, dtype=np.float32)


def find_cuts(diffs: np.ndarray, threshold: float = 30.0, ratio: float = 3.0, window: int = 8) -> list[int]:
    """Frame indices that start a new shot.

    A cut is a difference above `threshold` that also stands `ratio` times above the median of its
    neighbours: fast motion raises every difference around it, a cut raises one.
    """
    cuts = []
    for i in range(1, len(diffs)):
        lo, hi = max(1, i - window), min(len(diffs), i + window + 1)
        neighbours = np.concatenate([diffs[lo:i], diffs[i + 1:hi]])
        local = float(np.median(neighbours)) if len(neighbours) else 0.0
        if diffs[i] > threshold and diffs[i] > ratio * max(local, 1.0):
            cuts.append(i)
    return cuts


def shot_spans(frame_count: int, cuts: list[int]) -> list[tuple[int, int]]:
    """[start, end) frame spans of the shots between cuts."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < frame_count), frame_count]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def windows(shots: list[tuple[int, int]], fps: float, clip_s: float, margin_frames: int) -> list[tuple[int, int, int]]:
    """(shot_index, start, end) candidate clips of `clip_s` seconds inside each shot.

    `margin_frames` are dropped at each end of a shot that touches a cut, where blended or
    half-decoded transition frames live. A shot too short for one window still yields one
    candidate (its whole usable span), so the duration gate can reject it with a reason instead of
    it vanishing.
    """
    length = max(1, int(round(clip_s * fps)))
    out = []
    total = shots[-1][1] if shots else 0
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
