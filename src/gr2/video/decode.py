"""Decode frames: decord first (fast seeking, resize on decode), PyAV where decord cannot.

decord 0.6 carries an old FFmpeg that cannot open AV1 (DESIGN.md); any file the system ffmpeg
decodes must still decode here, so a reader falls back per file and says which decoder read it.

Frames come out as displayed: a phone's display matrix (rotation) applied, and `width` x `height`
is the displayed size. decord does this itself (it turns each frame, then scales it to the size
asked); PyAV hands frames over as stored, so `_displayed` turns them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from gr2.errors import Gr2Error
from gr2.video import probe


class DecodeError(Gr2Error):
    """A video whose frames cannot be decoded; names the file and what failed."""


class VideoReader:
    """Frames of one video as displayed, resized on decode to (width, height); `decoder` names who read it."""

    def __init__(self, path: str, width: int, height: int):
        self.path, self.width, self.height = path, int(width), int(height)
        self.decoder = "decord"
        try:
            import decord

            self._vr = decord.VideoReader(path, width=self.width, height=self.height, num_threads=1)
            self.frame_count = len(self._vr)
        except Exception:  # decord raises its own DECORDError or RuntimeError on codecs it lacks
            self._vr = None
            self.decoder = "pyav"
            self.frame_count = _pyav_frame_count(path)
        if self.frame_count <= 0:
            raise DecodeError(f"{path}: no decodable frames")

    def get(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """Frames at `indices` as uint8 [N, height, width, 3]."""
        indices = [int(i) for i in indices]
        if not indices:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        if self._vr is not None:
            try:
                return self._vr.get_batch(indices).asnumpy()
            except Exception:  # noqa: BLE001 - decord's own DECORDError; PyAV gets its turn below
                # decord opens some files it cannot seek in (MPEG-TS from camcorders: "Unable to
                # handle EOF"); a file the system ffmpeg decodes must not fail for decord's sake.
                self._vr, self.decoder = None, "pyav"
        try:
            return _pyav_get(self.path, indices, self.width, self.height)
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(f"{self.path}: decoding frames {indices[0]}..{indices[-1]} failed ({_first_line(e)})") from None

    def chunks(self, size: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Every frame in order, `size` at a time, as (first index, frames): memory stays bounded."""
        if self._vr is None:
            yield from _pyav_chunks(self.path, size, self.width, self.height)
            return
        for start in range(0, self.frame_count, size):
            yield start, self.get(range(start, min(start + size, self.frame_count)))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _open_av(path: str):
    import av

    try:
        container = av.open(path, options=probe.OPEN_OPTIONS)
        stream = container.streams.video[0]
    except Exception as e:
        raise DecodeError(f"{path}: cannot open for decoding ({_first_line(e)})") from None
    stream.thread_type = "AUTO"
    return container, stream


def _pyav_frame_count(path: str) -> int:
    container, stream = _open_av(path)
    with container:
        if stream.frames:
            return int(stream.frames)
        try:
            return sum(1 for _ in container.decode(stream))
        except Exception as e:
            raise DecodeError(f"{path}: decoding failed ({_first_line(e)})") from None


def _pyav_chunks(path: str, size: int, width: int, height: int) -> Iterator[tuple[int, np.ndarray]]:
    container, stream = _open_av(path)
    with container:
        buf, start = [], 0
        try:
            for frame in container.decode(stream):
                buf.append(_displayed(frame, width, height))
                if len(buf) == size:
                    yield start, np.stack(buf)
                    start, buf = start + size, []
        except Exception as e:
            raise DecodeError(f"{path}: decoding failed at frame {start + len(buf)} ({_first_line(e)})") from None
        if buf:
            yield start, np.stack(buf)


def _quarter_turns(frame) -> int:
    """Quarter turns counter-clockwise that show a PyAV frame upright (its display matrix, rounded)."""
    return int(round(frame.rotation / 90)) % 4


def _displayed(frame, width: int, height: int) -> np.ndarray:
    """A PyAV frame as displayed: uint8 [height, width, 3], turned by its display matrix."""
    turns = _quarter_turns(frame)
    if turns % 2:  # scaled while still on its side, so the turned frame is width x height
        width, height = height, width
    return np.rot90(frame.to_ndarray(format="rgb24", width=width, height=height), turns)


def display_size(path: str) -> tuple[int, int]:
    """(width, height) of a video's frames as displayed (display matrix applied)."""
    container, stream = _open_av(path)
    with container:
        try:
            frame = next(container.decode(stream), None)
        except Exception as e:
            raise DecodeError(f"{path}: decoding failed ({_first_line(e)})") from None
    if frame is None:
        raise DecodeError(f"{path}: no decodable frames")
    return (frame.height, frame.width) if _quarter_turns(frame) % 2 else (frame.width, frame.height)


def _pyav_get(path: str, indices: list[int], width: int, height: int) -> np.ndarray:
    # Decode forward once and keep the frames asked for: exact, and bounded by len(indices).
    wanted = {i: [] for i in indices}
    last = max(indices)
    for start, frames in _pyav_chunks(path, 32, width, height):
        for j, frame in enumerate(frames):
            if start + j in wanted:
                wanted[start + j].append(frame)
        if start + len(frames) > last:
            break
    missing = [i for i in indices if not wanted[i]]
    if missing:
        raise DecodeError(f"{path}: frames {missing[:5]} are past the end of the stream")
    return np.stack([wanted[i][0] for i in indices])


def fit_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so the short side is `short_side`, each even (codecs like even sizes)."""
    scale = short_side / max(1, min(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Square centre crop of [N, H, W, C] frames to size x size."""
    h, w = frames.shape[1:3]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return frames[:, top:top + size, left:left + size]


def shrink(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """[N, H, W, 3] uint8 frames resized to (width, height) with an antialiased bicubic filter, as the
    decoder's own scaler (swscale) would have made them from the source: the cut detectors' thresholds
    were set on such frames. Area averaging from the clips' 128 px frames found the same cuts but 19
    false ones to 10 (benchmarks/cut_detection.py); this filter gives 13."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])
