"""The ingest-robot Prefect flow on the real RT-1, Bridge and xhand samples, and the two commands."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pytest

from gr2.lake.lake import Lake

SAMPLES = Path(__file__).parent / "data" / "robot"


def _commands() -> argparse.ArgumentParser:
    from gr2.flows.robot_cli import register

    p = argparse.ArgumentParser(prog="gr2")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_the_flow_ingests_the_real_samples_and_records_the_build(ray_local, prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from gr2.flows.robot import ingest_robot_trajectories

    broken = shutil.copytree(SAMPLES / "bridge", tmp_path / "bridge-broken")
    (broken / "videos/val/10/rgb.mp4").write_bytes(b"\x00" * 100)
    sources = [str(SAMPLES / n) for n in ("rt1", "bridge", "xhand")] + [str(broken), str(tmp_path / "missing")]
    lake = str(tmp_path / "lake")

    out = ingest_robot_trajectories(sources=sources, lake=lake, config={"frame_width": 128, "frame_height": 128})
    f = out["funnel"]
    assert (f["episodes"], f["accepted"], f["rejected"], f["failed"]) == (5, 3, 0, 2)
    assert f["steps_added"] == 29 + 24 + 136

    the_lake = Lake(lake)
    episodes = the_lake.read("episodes")
    failed = episodes.filter(pc.equal(episodes["status"], "failed")).column("reason").to_pylist()
    assert any("bridge-broken#val/10: camera rgb: unreadable video" in r for r in failed)
    assert any("missing: cannot list episodes" in r for r in failed)
    xhand = episodes.filter(pc.equal(episodes["dataset"], "xhand")).to_pylist()[0]
    assert xhand["cameras"] == ["0", "1", "2"] and xhand["instruction"] == "Move the mango to the basket."
    assert (xhand["frame_width"], xhand["frame_height"]) == (128, 128)

    build = the_lake.latest_build("ingest-robot")
    assert build["build_id"] == out["build_id"] and build["funnel"]["accepted"] == 3
    assert json.loads(json.dumps(build["config"]))["frame_width"] == 128
    for table in ("episodes", "steps"):
        assert out["build_id"] in the_lake.dataset(table).tags.list()
    assert set(out["stats"]) == {"rt1", "bridge", "xhand"}
    # the doctor's summary of every dataset that gained episodes rides along with the funnel
    assert set(f["doctor"]) == {"rt1", "bridge", "xhand"} and f["doctor"]["xhand"]["episodes"] == 1

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["robot-ingest-funnel"])))
    assert any(out["build_id"] in (a.data or "") and "| accepted | 3 |" in a.data and "**Doctor**" in a.data
               for a in artifacts)


def test_ingest_robot_command_parses_offsets_and_rejects_unknown_settings(tmp_path):
    from gr2.flows.options import CommandError
    from gr2.flows.robot_cli import ingest_robot

    args = _commands().parse_args(["ingest-robot", "--lake", str(tmp_path / "lake"), "a", "b",
                                   "--offset", "corner=0.03", "--offset", "gripperPOV=0.055",
                                   "--estimate-offsets", "head", "--max-step-hz", "20"])
    assert args.sources == ["a", "b"] and args.run is ingest_robot
    bad = _commands().parse_args(["ingest-robot", "--lake", "x", "a", "--offset", "corner"])
    with pytest.raises(CommandError, match="expected CAMERA=SECONDS"):
        bad.run(bad)
    config = tmp_path / "c.yaml"
    config.write_text("max_flagged_fraction: 0.3\nbogus: 1\n")
    bad = _commands().parse_args(["ingest-robot", "--lake", "x", "a", "--config", str(config)])
    with pytest.raises(Exception, match=r"unknown settings \['bogus'\]"):
        bad.run(bad)


def test_record_metaworld_command_writes_a_dataset_then_refuses_to_overwrite_it(ray_local, tmp_path):
    # ray_local: the episode renders in a Ray worker, never beside torch in this process.
    from gr2.errors import Gr2Error  # what the CLI prints as one line

    out = tmp_path / "mw"
    args = _commands().parse_args(["record-metaworld", "--out", str(out), "--tasks", "reach-v3",
                                   "--episodes", "1", "--size", "48"])
    text = args.run(args)
    assert text.startswith("recorded 1 episodes (1 successful") and "corner 20 Hz +30 ms" in text
    info = json.loads((out / "meta/info.json").read_text())
    assert info["features"]["observation.images.corner"]["shape"] == [48, 48, 3]
    with pytest.raises(Gr2Error, match="already holds a dataset"):
        args.run(args)
    bad = _commands().parse_args(["record-metaworld", "--out", str(tmp_path / "x"), "--tasks", "fly-to-the-moon-v3"])
    with pytest.raises(Gr2Error, match="no scripted expert"):
        bad.run(bad)
