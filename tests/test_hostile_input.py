"""Hostile input: manifests and flow parameters that try to break the build end in a clear error or a
failed row, never a traceback or a lost input."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gr2.video import build, sources
from gr2.video.config import BuildConfig

# Cells of 5-20k characters are meant (hostile manifests); Hypothesis' data_too_large health check
# otherwise fails the run at random (2 of 3 clean-clone runs) before any assertion is checked.
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])

cell = st.one_of(st.none(), st.text(max_size=40), st.integers(), st.floats(allow_nan=True), st.booleans(),
                 st.text(min_size=5000, max_size=20000), st.binary(max_size=30))
row = st.dictionaries(st.sampled_from(["uri", "caption", "dataset", "extra", "URI"]), cell, max_size=5)


def outcome(path: str):
    """Manifest -> inputs -> hashed rows: either a SourceError or every row accounted for."""
    try:
        inputs = sources.read_manifest(path)
    except sources.SourceError as e:
        assert path in str(e) and "\n" not in str(e)
        return None
    batch = {"uri": np.array([i["uri"] for i in inputs], dtype=object),
             "source_error": np.array([i["source_error"] for i in inputs], dtype=object)}
    hashed = build.hash_inputs(batch) if inputs else {"error": []}
    for i, err in zip(inputs, hashed["error"]):
        assert isinstance(i["uri"], str) and i["uri"]
        assert err is None or isinstance(err, str)
    return inputs


@SETTINGS
@given(rows=st.lists(row, max_size=8))
def test_any_jsonl_manifest_is_an_error_or_accounted_rows(rows, tmp_path):
    path = tmp_path / "m.jsonl"
    lines = []
    for r in rows:
        safe = {k: (v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in r.items()}
        lines.append(json.dumps(safe))
    path.write_text("\n".join(lines))
    got = outcome(str(path))
    if got is not None:
        assert len(got) == sum(1 for r in rows)


@SETTINGS
@given(raw=st.binary(max_size=400))
def test_arbitrary_bytes_as_a_manifest_never_crash(raw, tmp_path):
    for ext in ("csv", "jsonl", "parquet"):
        path = tmp_path / f"m.{ext}"
        path.write_bytes(raw)
        outcome(str(path))


@SETTINGS
@given(uris=st.lists(st.one_of(st.none(), st.text(max_size=60), st.just("same.mp4")), max_size=10))
def test_csv_and_parquet_manifests_with_odd_uris_keep_every_row(uris, tmp_path):
    table = pa.table({"uri": pa.array(uris, pa.string()), "caption": pa.array(["c"] * len(uris), pa.string())})
    pq.write_table(table, tmp_path / "m.parquet")
    got = outcome(str(tmp_path / "m.parquet"))
    assert got is not None and len(got) == len(uris)
    # Rows without a uri are failed inputs that name their row, not dropped rows.
    for u, i in zip(uris, got):
        if u is None or not u.strip():
            assert "missing uri" in i["source_error"]


def test_non_utf8_csv_is_a_clear_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"uri,caption\n\xff\xfe.mp4,\xc3\x28 broken\n")
    got = outcome(str(path))
    assert got is None or len(got) == 1


def test_duplicated_uris_in_a_manifest_are_one_input(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"uri": "a.mp4", "caption": "x"}\n{"uri": "a.mp4"}\n{"uri": "b.mp4"}\n')
    assert [os.path.basename(i["uri"]) for i in sources.list_inputs([str(path)])] == ["a.mp4", "b.mp4"]


@SETTINGS
@given(settings_=st.dictionaries(
    st.sampled_from(list(BuildConfig.model_fields) + ["bogus", ""]),
    st.one_of(st.none(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=10), st.booleans()),
    max_size=4))
def test_build_config_accepts_or_names_the_bad_setting(settings_):
    try:
        config = BuildConfig(**settings_)
    except ValidationError as e:
        assert e.errors() and all(err["loc"] for err in e.errors())
        return
    assert len(config.hash()) == 16


@pytest.mark.parametrize("params,words", [
    ({"sources": [], "lake": "x"}, "sources"),
    ({"sources": ["  "], "lake": "x"}, "blank"),
    ({"sources": ["a"], "lake": ""}, "lake"),
])
def test_flow_parameters_are_validated_before_work(params, words):
    from gr2.flows.build import BuildParams

    with pytest.raises(ValidationError, match=words):
        BuildParams(**params)


def test_the_cli_turns_bad_parameters_into_one_line(tmp_path, capsys):
    from gr2.flows.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("clip_s: -1\nnot_a_setting: 3\n")
    assert main(["build-videos", "--lake", str(tmp_path / "l"), "--config", str(cfg), "x.mp4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "clip_s" in err and "not_a_setting" in err
    cfg.write_text("clip_s: [unclosed\n")
    assert main(["build-videos", "--lake", str(tmp_path / "l"), "--config", str(cfg), "x.mp4"]) == 2
    assert "does not parse" in capsys.readouterr().err


def test_reading_the_lake_never_unpickles():
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = subprocess.run(["git", "grep", "-nE", r"pickle\.loads?\(|allow_pickle" "=True|torch\.load\(", "--",
                           "src"], cwd=root, capture_output=True, text=True).stdout
    bad = [h for h in hits.splitlines() if "weights_only=True" not in h]
    assert not bad, bad


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_calvin_annotation_file_carrying_code_is_refused(tmp_path):
    from gr2.robot.calvin import load_object_npy
    from gr2.robot.episode import EpisodeError

    path = tmp_path / "auto_lang_ann.npy"
    np.save(path, np.array([_Evil()], dtype=object))  # np.save pickles object arrays: the attack file
    with pytest.raises(EpisodeError, match="refusing to unpickle"):
        load_object_npy(str(path))


def test_the_download_cache_is_private_and_a_cut_short_entry_is_fetched_again(s3_bucket, media, tmp_path):
    import boto3

    from gr2.video.probe import ProbeError, local_copy

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).upload_file(str(media["webm"]), s3_bucket, "v.webm")
    uri = f"s3://{s3_bucket}/v.webm"
    cache = tmp_path / "cache"
    path = local_copy(uri, str(cache))
    assert (os.stat(cache).st_mode & 0o777) == 0o700 and open(path, "rb").read() == media["webm"].read_bytes()
    with open(path, "r+b") as f:  # a copy cut short (a killed download, a full disk)
        f.truncate(10)
    assert open(local_copy(uri, str(cache)), "rb").read() == media["webm"].read_bytes()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # others could plant a file under the name the next download would use
    with pytest.raises(ProbeError, match="not private"):
        local_copy(uri, str(shared))


@pytest.mark.parametrize("name,text,demuxer", [
    ("playlist.mp4", "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{video}\n#EXT-X-ENDLIST\n", "hls"),
    ("list.mkv", "ffconcat version 1.0\nfile '{video}'\n", "concat"),
])
def test_a_playlist_or_concat_list_given_as_a_video_is_rejected_unread(name, text, demuxer, media, tmp_path):
    from gr2.video import build
    from gr2.video.config import BuildConfig

    disguised = tmp_path / name
    disguised.write_text(text.format(video=media["tiny"]))
    row = build.survey_video({"uri": str(disguised), "local_path": str(disguised)}, BuildConfig())
    assert row["status"] == "rejected" and row["reason"].startswith(f"container: a {demuxer} file is not a video")
    real = build.survey_video({"uri": str(media["tiny"]), "local_path": str(media["tiny"])}, BuildConfig())
    assert real["status"] != "rejected" or not real["reason"].startswith("container")


def test_a_manifest_in_object_storage_names_only_objects(s3_bucket):
    import boto3

    rows = ["/etc/hostname", "file:///etc/hostname", "../elsewhere/x.mp4", "clips/a.mp4", f"s3://{s3_bucket}/b.mp4"]
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=s3_bucket, Key="videos/m.csv", Body=("uri\n" + "\n".join(rows) + "\n").encode())
    got = sources.read_manifest(f"s3://{s3_bucket}/videos/m.csv")
    errors = [g["source_error"] for g in got[:3]]
    assert all(e and "a local path; a manifest in object storage may name only objects" in e for e in errors)
    assert "'/etc/hostname'" in errors[0] and "row 1" in errors[0]
    assert [g["uri"] for g in got[3:]] == [f"s3://{s3_bucket}/videos/clips/a.mp4", f"s3://{s3_bucket}/b.mp4"]
    assert all(g["source_error"] is None for g in got[3:])


@pytest.mark.parametrize("template", ["/etc/{episode_index}.parquet", "../../outside/{episode_index}.parquet"])
def test_a_lerobot_data_path_outside_the_dataset_fails_its_episodes_naming_it(template, tmp_path):
    from test_robot_readers import write_lerobot_v2

    from gr2.robot.ingest import IngestConfig, list_sources, process_episode

    root = write_lerobot_v2(tmp_path / "ds", lengths=(6,))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["data_path"] = template
    (root / "meta" / "info.json").write_text(json.dumps(info))
    refs, _ = list_sources([str(root)])
    row, steps = process_episode(refs[0], IngestConfig(), "test")
    assert row["status"] == "failed" and steps is None
    assert "data_path names" in row["reason"] and "must stay inside its root" in row["reason"]


def test_an_annotation_video_path_outside_the_dataset_fails_the_episode(tmp_path):
    import shutil
    from pathlib import Path

    from gr2.robot.ingest import IngestConfig, list_sources, process_episode

    root = Path(shutil.copytree(Path(__file__).parent / "data" / "robot" / "rt1", tmp_path / "rt1"))
    ann_path = root / "annotation" / "val" / "6.json"
    ann = json.loads(ann_path.read_text())
    ann["videos"] = [{"video_path": "/etc/hostname"}]
    ann_path.write_text(json.dumps(ann))
    refs, failed = list_sources([str(root)])
    assert not failed
    row, _ = process_episode(refs[0], IngestConfig(), "test")
    assert row["status"] == "failed" and "video_path names '/etc/hostname'" in row["reason"]
