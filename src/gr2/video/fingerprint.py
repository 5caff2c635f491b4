"""Weight-free near-duplicates: a perceptual hash of each sampled frame, compared in time order.

A clip's fingerprint is one 64-bit pHash per sampled frame (the classic DCT hash that imagehash's
`phash` computes: 32x32 grey, 2-D DCT, the 8x8 lowest frequencies against their median). A hash
survives re-encoding, rescaling and mild colour changes; it needs no model, so it is on for every
build, where a random-init CLIP's embeddings carry no similarity worth acting on.

Two clips are near-duplicates when their frames match in order: the distance is the mean Hamming
distance of aligned frames, minimised over a shift of up to `max_shift` frames, so a copy trimmed
by a fraction of a clip still lines up. Hand-written (numpy, vectorised over a batch of frames)
rather than imagehash: one matrix product per batch, and no scipy/PyWavelets in every worker.
"""

from __future__ import annotations

import numpy as np

HASH_BITS = 64
DEFAULT_MAX_BITS = 8.0  # mean differing bits per aligned frame (of 64); see benchmarks/near_duplicates.py
DEFAULT_MAX_SHIFT = 2  # frames a trimmed copy may be offset by


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


_DCT32 = _dct_matrix(32)
_BITS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def frame_hashes(frames: np.ndarray) -> np.ndarray:
    """uint8 frames [N, H, W, 3] (or [N, H, W]) -> uint64 pHashes [N]."""
    from PIL import Image

    frames = np.asarray(frames)
    if len(frames) == 0:
        return np.zeros(0, np.uint64)
    grey = np.stack([np.asarray(Image.fromarray(f).convert("L").resize((32, 32), Image.BILINEAR), np.float32)
                     for f in frames])
    low = (_DCT32 @ grey @ _DCT32.T)[:, :8, :8].reshape(len(frames), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BITS).sum(axis=1, dtype=np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x.astype(np.uint64))


def distance(a: np.ndarray, b: np.ndarray, max_shift: int = DEFAULT_MAX_SHIFT) -> float:
    """Mean differing bits of `a` and `b` frame by frame, at their best shift of <= max_shift frames."""
    best = np.inf
    for shift in range(-max_shift, max_shift + 1):
        x, y = (a[shift:], b) if shift >= 0 else (a, b[-shift:])
        n = min(len(x), len(y))
        # at least half the frames must overlap, so a shift cannot reduce a match to one frame
        if n and n * 2 >= min(len(a), len(b)):
            best = min(best, float(popcount(x[:n] ^ y[:n]).mean()))
    return best


def nearest(query: np.ndarray, fingerprints: list[np.ndarray], max_shift: int = DEFAULT_MAX_SHIFT,
            skip: np.ndarray | None = None) -> tuple[int, float]:
    """Index and distance of the fingerprint nearest `query`; (-1, inf) when there are none.

    `skip`: a boolean mask of fingerprints not to consider (e.g. the query's own video's).

    Brute force over stacked arrays: 1M clips of 8 frames are 64 MB of hashes, a few ms per query.
    A lake much larger than that needs banded lookup first (multi-index hashing).
    """
    if not fingerprints:
        return -1, float("inf")
    keep = np.ones(len(fingerprints), bool) if skip is None else ~np.asarray(skip, bool)
    same = [i for i, f in enumerate(fingerprints) if keep[i] and len(f) == len(query)]
    best = (-1, float("inf"))
    if same:
        stack = np.stack([fingerprints[i] for i in same])
        for shift in range(-max_shift, max_shift + 1):
            x, y = (query[shift:], stack[:, : len(query) - shift]) if shift >= 0 else (query[: len(query) + shift], stack[:, -shift:])
            if len(x) * 2 < len(query):
                continue
            d = popcount(x[None, :] ^ y).mean(axis=1)
            k = int(np.argmin(d))
            if d[k] < best[1]:
                best = (same[k], float(d[k]))
    for i, f in enumerate(fingerprints):
        if keep[i] and len(f) != len(query):
            d = distance(query, f, max_shift)
            if d < best[1]:
                best = (i, d)
    return best
