"""Gates: keep-or-not with a reason. A gate never drops a row; it sets status and reason."""

from __future__ import annotations

import numpy as np

from gr2.video.config import BuildConfig


def video_gate(info: dict, config: BuildConfig) -> str | None:
    """The reason a probed video is rejected (gate and score), or None when it passes."""
    duration, fps = info.get("duration_s"), info.get("fps")
    short = min(info.get("width") or 0, info.get("height") or 0)
    if duration is None or duration < config.min_duration_s:
        return f"duration: {duration or 0:.2f}s < {config.min_duration_s}s"
    if config.max_duration_s and duration > config.max_duration_s:
        return f"duration: {duration:.1f}s > {config.max_duration_s}s"
    if short < config.min_short_side:
        return f"resolution: {info.get('width')}x{info.get('height')} short side {short} < {config.min_short_side}"
    if fps is None or fps < config.min_fps:
        return f"fps: {fps or 0:.2f} < {config.min_fps}"
    return None


def reject(batch: dict[str, np.ndarray], reasons: list[str | None]) -> dict[str, np.ndarray]:
    """The batch with every accepted row a gate gave a reason rejected, with it; other rows as they were.

    The one place a gate's verdict becomes `status` and `reason` (a batch without them is all accepted).
    """
    n = len(reasons)
    status = [str(s) for s in batch["status"]] if "status" in batch else ["accepted"] * n
    reason = list(batch["reason"]) if "reason" in batch else [""] * n
    for i, why in enumerate(reasons):
        if why and status[i] == "accepted":
            status[i], reason[i] = "rejected", why
    return {**batch, "status": np.array(status, dtype=object), "reason": np.array(reason, dtype=object)}


def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 luma of uint8 RGB frames [T, H, W, 3] as float32 [T, H, W]."""
    f = frames.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def clip_scores(frames: np.ndarray) -> dict[str, float]:
    """black (mean luma), blank (mean per-frame luma std) and motion (mean abs frame difference)."""
    y = luma(frames)
    motion = float(np.abs(np.diff(y, axis=0)).mean()) if len(y) > 1 else 0.0
    return {
        "black_score": float(y.mean()),
        "blank_score": float(y.reshape(len(y), -1).std(axis=1).mean()),
        "motion_score": motion,
    }


def clip_gate(scores: dict[str, float], duration_s: float, config: BuildConfig) -> str | None:
    """The reason a candidate clip is rejected (gate and score), or None when it passes."""
    if duration_s < config.min_clip_s:
        return f"duration: {duration_s:.2f}s < {config.min_clip_s}s"
    if scores["black_score"] < config.black_threshold:
        return f"black: mean luma {scores['black_score']:.1f} < {config.black_threshold}"
    if scores["blank_score"] < config.blank_threshold:
        return f"blank: luma std {scores['blank_score']:.2f} < {config.blank_threshold}"
    if scores["motion_score"] < config.static_threshold:
        return f"static: motion {scores['motion_score']:.3f} < {config.static_threshold}"
    return None
