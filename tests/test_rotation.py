"""Rotated footage (a phone's display matrix) is decoded, probed and stored as displayed."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
from conftest import ffmpeg_encode
from PIL import Image

from gr2.lake.lake import Lake
from gr2.robot.episode import VideoFrames
from gr2.video import build, decode, probe, tokenize
from gr2.video.config import BuildConfig

WIDTH, HEIGHT = 160, 96  # stored (coded) size: landscape, so a quarter turn shows as portrait
ANGLES = (90, 180, 270)
# Which decoder reads each codec: decord cannot open AV1, so PyAV does (decode.py).
CODECS = {"h264": (["-c:v", "libx264"], "decord"), "av1": (["-c:v", "libaom-av1", "-cpu-used", "8"], "pyav")}


def ffprobe_rotation(path) -> int:
    """The display matrix's angle (degrees counter-clockwise) as ffprobe itself reports it."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream_side_data=rotation", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(float(out.strip() or 0)) % 360


@pytest.fixture(scope="session")
def rotated(tmp_path_factory) -> dict[tuple[str, int], str]:
    """{(codec, angle): path}: one upright encode per codec and copies of its stream with a display matrix."""
    d = tmp_path_factory.mktemp("rotated")
    out = {}
    for codec, (args, _) in CODECS.items():
        upright = ffmpeg_encode(d / f"{codec}.mp4", "-f", "lavfi", "-i",
                                f"testsrc=size={WIDTH}x{HEIGHT}:rate=10:duration=2.5", *args, "-pix_fmt", "yuv420p")
        out[codec, 0] = str(upright)
        for angle in ANGLES:
            # The same coded stream (-c copy); only the container's display matrix differs.
            path = ffmpeg_encode(d / f"{codec}_{angle}.mp4", "-i", str(upright), "-c", "copy",
                                 "-metadata:s:v", f"rotate={angle}")
            assert ffprobe_rotation(path) == angle, f"this ffmpeg wrote {ffprobe_rotation(path)} for rotate={angle}"
            out[codec, angle] = str(path)
    return out


def displayed_size(angle: int) -> tuple[int, int]:
    return (HEIGHT, WIDTH) if angle % 180 else (WIDTH, HEIGHT)


def shown_by_ffmpeg(path: str, angle: int) -> np.ndarray:
    """Frame 0 as ffmpeg's own player shows it (ffmpeg applies the display matrix by default)."""
    w, h = displayed_size(angle)
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-frames:v", "1", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(h, w, 3)


@pytest.mark.parametrize("angle", ANGLES)
@pytest.mark.parametrize("codec", CODECS)
def test_rotated_video_decodes_as_displayed_by_either_decoder(rotated, codec, angle):
    reader = decode.VideoReader(rotated[codec, angle], *displayed_size(angle))
    upright = decode.VideoReader(rotated[codec, 0], WIDTH, HEIGHT)
    assert reader.decoder == upright.decoder == CODECS[codec][1]
    got, flat = reader.get([0, 7, 20]), upright.get([0, 7, 20])
    # The display matrix's angle is counter-clockwise, as np.rot90 turns.
    expected = np.rot90(flat, angle // 90, axes=(1, 2))
    assert got.shape == expected.shape == (3, *displayed_size(angle)[::-1], 3)
    assert np.array_equal(got, expected)
    # ...and that is the picture ffmpeg's player shows, not our reading of the sign.
    assert np.abs(expected[0].astype(int) - shown_by_ffmpeg(rotated[codec, angle], angle)).mean() < 3
    chunked = np.concatenate([frames for _, frames in reader.chunks(8)])
    assert np.array_equal(chunked[[0, 7, 20]], got)


@pytest.mark.parametrize("codec", CODECS)
def test_a_rotated_video_resized_on_decode_keeps_its_displayed_shape(rotated, codec):
    small = decode.VideoReader(rotated[codec, 90], 60, 100).get([3])
    flat = decode.VideoReader(rotated[codec, 0], 100, 60).get([3])
    assert small.shape == (1, 100, 60, 3)
    # Scaling then turning differs from turning then scaling by filtering only (a wrong turn: > 100).
    assert np.abs(small.astype(int) - np.rot90(flat, 1, axes=(1, 2))).mean() < 15


def test_probe_reports_the_displayed_size_and_the_angle(rotated):
    for angle in (0, *ANGLES):
        info = probe.probe(rotated["h264", angle])
        assert (info["width"], info["height"], info["rotation"]) == (*displayed_size(angle), angle)


def test_a_rotate_tag_turns_clockwise_the_display_matrix_counter_clockwise():
    # Older muxers leave only the tag, whose angle is clockwise (ffmpeg's own get_rotation reads it so).
    assert probe._rotation({"tags": {"rotate": "90"}}) == 270
    assert probe._rotation({"side_data_list": [{"rotation": -90}], "tags": {"rotate": "90"}}) == 270


def test_robot_camera_frames_of_a_rotated_mp4_are_upright(rotated):
    got = VideoFrames(rotated["h264", 270]).get([0, 5])
    flat = VideoFrames(rotated["h264", 0]).get([0, 5])
    assert np.array_equal(got, np.rot90(flat, 3, axes=(1, 2)))


def token_frames(path: str) -> np.ndarray:
    """A clip's frames as the tokenize stage decodes them, at the size the lake records (the probed one)."""
    info = probe.probe(path)
    return tokenize.clip_frames(path, info["width"], info["height"], [0, 9], frame_size=64, resolution=32)


def test_token_frames_of_a_rotated_clip_are_upright(rotated):
    got, flat = token_frames(rotated["h264", 90]), token_frames(rotated["h264", 0])
    # The centre square of the turned frame is the turned centre square of the upright one.
    assert np.abs(got.astype(int) - np.rot90(flat, 1, axes=(1, 2))).mean() < 6


def survey_clip_frames(path: str, config: BuildConfig) -> tuple[dict, np.ndarray]:
    """A video's survey row and its clips' frames, as the build's stages give them (no Ray)."""
    item = {"uri": path, "local_path": path}
    row = build.survey_video(item, config)
    specs = build.clip_specs({**item, **row, "video_id": "v", "caption": None, "dataset": None,
                              "windows": json.dumps(row["windows"])}, config, "b")
    batch = {k: np.array([s[k] for s in specs], dtype=object) for k in specs[0]}
    return row, build.read_clip_frames(batch, config)["frames"]


@pytest.mark.parametrize("codec", CODECS)
def test_a_rotated_video_decoded_once_gives_its_clips_upright_frames_as_two_passes_do(rotated, codec, monkeypatch):
    config = BuildConfig(frame_size=64, frames_per_clip=4)
    row, once = survey_clip_frames(rotated[codec, 90], config)
    assert row["survey_frames"] and row["frames_decoded"] == row["frame_count"] and row["decoder"] == CODECS[codec][1]
    _, flat = survey_clip_frames(rotated[codec, 0], config)
    turned = {k: np.abs(once.astype(int) - np.rot90(flat, k, axes=(2, 3))).mean() for k in range(4)}
    # the upright frames turned a quarter, up to scaling before or after the turn (decord turns first)
    assert turned[1] < 12 and min(v for k, v in turned.items() if k != 1) > 30, turned
    monkeypatch.setattr(build, "KEEP_FRAMES_BYTES", 0)  # decoded again for the clips, as a long video is
    row, twice = survey_clip_frames(rotated[codec, 90], config)
    assert not row["survey_frames"] and np.abs(once.astype(int) - twice).mean() < 1


def _thumbnail(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["thumbnail"])).convert("RGB")).astype(int)


def test_a_build_stores_rotated_footage_upright_with_its_displayed_size(ray_local, rotated, lake_dir):
    config = BuildConfig(frame_size=64, frames_per_clip=4, clip_model=None, caption_model=None)
    paths = {path: key for key, path in rotated.items()}
    lake = Lake(lake_dir)
    build.run_build(list(paths), lake, config, log=lambda *_: None)
    videos = {paths[r["uri"]]: r for r in lake.read("videos").to_pylist()}
    assert len(videos) == len(rotated)
    for (codec, angle), row in videos.items():
        assert (row["width"], row["height"], row["rotation"]) == (*displayed_size(angle), angle), row
        assert row["decoder"] == CODECS[codec][1]
    clips = {(paths[r["uri"]], r["start_frame"]): r for r in lake.read("clips").to_pylist()}
    for (key, start), clip in clips.items():
        codec, angle = key
        upright = _thumbnail(clips[(codec, 0), start])
        thumb = _thumbnail(clip)
        turned = {k: np.abs(thumb - np.rot90(upright, k)).mean() for k in range(4)}
        assert turned[angle // 90] < 12 and min(v for k, v in turned.items() if k != angle // 90) > 30, (key, turned)
