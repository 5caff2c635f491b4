"""The dataset doctor on the real RT-1 sample and on copies of it damaged on purpose, one defect each."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gr2.lake.lake import Lake

SAMPLE = Path(__file__).parent / "data" / "robot" / "rt1"
FILTERS = {  # ffmpeg filters that damage the RT-1 sample video (29 frames at 3 fps)
    "black": "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='between(n,8,14)'",
    "frozen": "split[a][b];[a][b]freezeframes=first=10:last=20:replace=10",
    "swapped": "colorchannelmixer=rr=0:rb=1:br=1:bb=0",
}


def _episode(root: Path, key: str, video_filter: str | None = None, edit=None) -> None:
    """A copy of the sample's episode 6 as episode `key`, its video re-encoded through `video_filter`."""
    meta = json.loads((SAMPLE / "annotation/val/6.json").read_text())
    video = root / f"videos/val/{key}/rgb.mp4"
    video.parent.mkdir(parents=True)
    args = ["-filter_complex", video_filter] if video_filter else []
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(SAMPLE / "videos/val/6/rgb.mp4"), *args,
                    "-c:v", "mpeg4", "-q:v", "2", str(video)], check=True)
    meta["videos"] = [{"video_path": f"videos/val/{key}/rgb.mp4"}]
    meta["latent_videos"] = []
    if edit:
        edit(meta)
    (root / f"annotation/val/{key}.json").write_text(json.dumps(meta))


def _wild_state(meta: dict) -> None:
    meta["state"][12][0] = 250.0  # metres: far outside anything the arm did (and so the actions into and out of it)


def _nan_state(meta: dict) -> None:
    meta["state"][5][2] = float("nan")


@pytest.fixture(scope="module")
def diagnosis(ray_local, tmp_path_factory):
    from gr2.robot.doctor import examine
    from gr2.robot.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("doctor") / "rt1"
    (root / "annotation/val").mkdir(parents=True)
    _episode(root, "clean")
    _episode(root, "clean2", "eq=brightness=0.02")  # a second healthy camera day, for the colour majority
    for key, video_filter in FILTERS.items():
        _episode(root, key, video_filter)
    _episode(root, "wild", edit=_wild_state)
    _episode(root, "nan", edit=_nan_state)
    lake = Lake(str(root.parent / "lake"))
    ingest([str(root)], lake, IngestConfig(frame_width=128, frame_height=128))
    diagnosis = examine(lake)
    diagnosis.lake = lake
    return diagnosis


def _checks(diagnosis, key: str) -> set[str]:
    return {f.check for f in diagnosis.findings if f.episode_key == f"val/{key}"}


def test_each_damaged_episode_shows_its_one_defect_and_the_clean_ones_none(diagnosis):
    assert _checks(diagnosis, "clean") == set()
    assert _checks(diagnosis, "clean2") == set()
    assert _checks(diagnosis, "black") == {"black"}
    assert _checks(diagnosis, "frozen") == {"frozen"}
    assert _checks(diagnosis, "swapped") == {"channel_swap"}
    assert _checks(diagnosis, "wild") == {"out_of_range"}
    assert _checks(diagnosis, "nan") == {"refused"}


def test_findings_say_where_and_what(diagnosis):
    by = {(f.episode_key, f.check): f for f in diagnosis.findings}
    assert "from frame 8" in by[("val/black", "black")].detail
    assert "longest 11 frames (from frame 10)" in by[("val/frozen", "frozen")].detail
    wild = [f.detail for f in diagnosis.findings if f.episode_key == "val/wild"]
    assert any(d.startswith("state[0] far outside") and "(first: step 12)" in d for d in wild)
    assert any(d.startswith("action[0] far outside") for d in wild)
    assert "state is nan at step 5 (dim 2)" in by[("val/nan", "refused")].detail
    assert by[("val/swapped", "channel_swap")].camera == "rgb"


def test_the_command_prints_a_table_and_writes_json_and_a_picture(diagnosis, tmp_path, capsys):
    from gr2.flows.cli import main

    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    assert main(["doctor", "--lake", diagnosis.lake.root, "--json", str(out_json), "--png", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "rt1: 7 episodes, 5 with findings" in text and "channel_swap" in text
    report = json.loads(out_json.read_text())
    assert report["counts"]["rt1"]["black"] == 1 and len(report["findings"]) == 6  # wild: its state and the actions around it
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000


def test_a_lake_without_episodes_is_a_one_line_error(tmp_path, capsys):
    from gr2.flows.cli import main

    assert main(["doctor", "--lake", str(tmp_path / "none")]) == 2
    assert "no robot episodes" in capsys.readouterr().err
