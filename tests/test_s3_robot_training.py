"""Robot episodes read from object storage, and training data read back from a lake on object
storage, against moto's S3 server on loopback. The same commands on a 2-node Ray cluster, where
every worker must reach the store, are in test_two_node_cluster.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

SAMPLES = Path(__file__).parent / "data" / "robot"


def upload(directory: Path, bucket: str, prefix: str) -> str:
    """Every file under `directory` to s3://bucket/prefix/...; returns that URI."""
    import boto3

    s3 = boto3.client("s3")
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def local_ids(root: Path) -> set[str]:
    """Content ids of a local LeRobot dataset's episodes: what the same bytes on S3 must get."""
    from gr2.robot import lerobot

    return {lerobot.load_episode(r).content_id() for r in lerobot.list_episodes(str(root))}


def test_an_s3_episode_whose_video_vanishes_after_listing_fails_with_the_reason(s3_bucket, recorded):
    import boto3

    from gr2.robot.ingest import IngestConfig, list_sources, process_episode

    source = upload(recorded, s3_bucket, "robot/metaworld")
    refs, failures = list_sources([source])
    assert not failures and [r.key for r in refs] == ["episode_000000", "episode_000001"]
    assert all(r.source == source and any(f.endswith(".mp4") for f in r.files) for r in refs)
    # a worker fetches the dataset's meta/ and its own episode's files, not the other episode's
    assert not any("episode_000001" in f for f in refs[0].files) and sum("episode_000001" in f for f in refs[1].files) == 5
    video = "robot/metaworld/videos/chunk-000/observation.images.corner/episode_000001.mp4"
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key=video)

    kept, _ = process_episode(refs[0], IngestConfig(), "test")
    row, steps = process_episode(refs[1], IngestConfig(), "test")
    assert kept["status"] == "accepted" and kept["source"] == source
    assert row["status"] == "failed" and steps is None
    assert row["reason"].startswith(f"{source}#episode_000001: cannot read {source}/videos/chunk-000/"
                                    "observation.images.corner/episode_000001.mp4: ")
    assert "gr2-robot-" not in row["reason"]  # names the object, not the local mirror


def write_robomimic(path: Path) -> Path:
    import h5py

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_kwargs": {"control_freq": 20}})
        for d, n in enumerate((6, 4)):
            g = data.create_group(f"demo_{d}")
            g["actions"] = rng.normal(size=(n, 7))
            g["obs/agentview_image"] = rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
            g["obs/robot0_eef_pos"] = np.cumsum(np.full((n, 3), 0.01), axis=0)
            g["obs/robot0_eef_quat"] = np.tile([0, 0, 0, 1.0], (n, 1))
    return path


def write_layout(layout: str, root: Path) -> Path:
    """A small dataset of `layout` under `root`; returns the source (a directory, or one HDF5 file)."""
    import shutil

    from test_robot_readers import write_calvin, write_lerobot_v2, write_lerobot_v3

    if layout == "lerobot-v2":
        return write_lerobot_v2(root / "v2")
    if layout == "lerobot-v3":
        write_lerobot_v3(root / "v3")
        return root / "v3"
    if layout == "calvin":
        return write_calvin(root / "validation")
    if layout == "annotated-json":
        return shutil.copytree(SAMPLES / "rt1", root / "rt1")
    if layout == "hdf5-file":
        return write_robomimic(root / "lift.hdf5")
    write_robomimic(root / "demos" / "lift.hdf5")
    return root / "demos"


@pytest.mark.parametrize("layout", ["lerobot-v2", "lerobot-v3", "calvin", "annotated-json", "hdf5-file", "hdf5-dir"])
def test_an_s3_source_yields_the_episodes_and_steps_the_same_files_on_disk_do(s3_bucket, tmp_path, layout):
    import boto3

    from gr2.robot.ingest import IngestConfig, list_sources, process_episode

    local = write_layout(layout, tmp_path)
    if local.is_file():
        boto3.client("s3").upload_file(str(local), s3_bucket, f"robot/{local.name}")
        source = f"s3://{s3_bucket}/robot/{local.name}"
    else:
        source = upload(local, s3_bucket, f"robot/{local.name}")
    local_refs, local_failures = list_sources([str(local)])
    refs, failures = list_sources([source])
    assert not local_failures and not failures
    assert [(r.key, r.format, r.cameras, r.dataset) for r in refs] == [(r.key, r.format, r.cameras, r.dataset) for r in local_refs]

    config = IngestConfig(frame_width=32, frame_height=32)
    for here, there in zip(local_refs, refs):
        expected, expected_steps = process_episode(here, config, "test")
        row, steps = process_episode(there, config, "test")
        assert expected["status"] == "accepted", expected["reason"]
        assert (row["status"], row["episode_id"], row["source"]) == ("accepted", expected["episode_id"], source)
        assert steps.equals(expected_steps)


def test_an_s3_episode_whose_files_cannot_be_named_fails_with_the_reason_it_has_on_disk(s3_bucket, tmp_path):
    from test_robot_readers import write_lerobot_v2

    from gr2.robot.ingest import IngestConfig, list_sources, process_episode

    local = write_lerobot_v2(tmp_path / "v2")
    info = json.loads((local / "meta/info.json").read_text())
    del info["video_path"]  # the cameras' files cannot be found, here or there
    (local / "meta/info.json").write_text(json.dumps(info))
    source = upload(local, s3_bucket, "robot/v2")
    local_refs, _ = list_sources([str(local)])
    refs, failures = list_sources([source])
    assert not failures and len(refs) == len(local_refs) == 2  # the source lists; its episodes fail one by one
    for here, there in zip(local_refs, refs):
        expected, _ = process_episode(here, IngestConfig(), "test")
        row, _ = process_episode(there, IngestConfig(), "test")
        assert expected["status"] == row["status"] == "failed"
        assert row["reason"] == expected["reason"].replace(str(local), source)


def test_the_training_data_plan_reads_an_s3_lake_and_its_tokenizer_there(s3_bucket, tmp_path):
    # Training itself on an S3 lake runs on a 2-node cluster (test_two_node_cluster.py); here the
    # driver's side, without Ray: the plan names the tokenizer on S3 and batches read back from it.
    from test_training_lakes import clips_lake, robot_lake, save_tokenizer

    from gr2.lake.uri import url_to_fs
    from gr2.training.data import DataConfig, iter_batches, iter_samples, plan_data

    root = f"s3://{s3_bucket}/lake"
    tokenizer, tokenizer_id = save_tokenizer(str(tmp_path))
    # the project's own filesystem call: it names the endpoint, where a bare fsspec.filesystem("s3") is
    # reused from an earlier test of this process that pointed AWS_ENDPOINT_URL elsewhere (port 9, refused)
    fs, path = url_to_fs(f"{root}/models/tokenizers/{tokenizer_id}")
    fs.put(tokenizer, path, recursive=True)
    lake = robot_lake(root, episodes=4, length=10, tokenizer_id=tokenizer_id)

    spec = plan_data(lake, "finetune", history=2, chunk=2, config=DataConfig(shuffle_buffer=8))
    assert spec.tokenizer_path == f"{root}/models/tokenizers/{tokenizer_id}" and len(spec.train_ids) == 3
    batch = next(iter_batches(spec, 4))
    assert tuple(batch["frames"].shape) == (4, 2, 2, 4)
    clips_lake(root, clips=6, frames=4, tokenizer_id=tokenizer_id)
    pre = plan_data(lake, "pretrain", history=2, chunk=0)
    windows = [s["id"] for s in iter_samples(pre, epochs=1, shuffle=False)]
    assert sorted(windows) == sorted(f"{c}@{t}" for c in pre.train_ids for t in range(3))
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1")  # the loopback server, never a real store


def test_no_aws_key_travels_in_ray_metadata_or_a_pickled_filesystem(monkeypatch):
    import pickle

    from gr2.lake.lake import worker_env
    from gr2.training.launcher import _storage

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-not-for-ray")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    env = worker_env()["runtime_env"]["env_vars"]
    assert env == {k: v for k, v in env.items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_SESSION"))}
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"  # where the store is still reaches the workers
    storage = _storage("s3://bucket/runs")["storage_filesystem"]
    assert b"s3cr3t-not-for-ray" not in pickle.dumps(storage)


def test_a_tokenizer_on_s3_is_read_from_the_endpoint_named_now(s3_bucket, tmp_path, monkeypatch):
    # In a full run a tokenizer read failed with "connection refused" from a port an earlier test's
    # fault proxy had used: the checkpoint code opened a bare fsspec filesystem, which fsspec reuses
    # across calls with the same arguments, so it kept the endpoint of its first call. Here that first
    # call goes to a second server that then stops; the next read must follow AWS_ENDPOINT_URL back.
    from moto.server import ThreadedMotoServer
    from test_training_lakes import save_tokenizer

    from gr2.tokenizers import load_checkpoint, save_checkpoint

    local, tokenizer_id = save_tokenizer(str(tmp_path))
    tokenizer = load_checkpoint(local).tokenizer
    home = os.environ["AWS_ENDPOINT_URL"]
    other = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the same buckets, in process
    other.start()
    host, port = other.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    uri = f"s3://{s3_bucket}/models/tokenizers/{tokenizer_id}"
    assert save_checkpoint(tokenizer, uri) == tokenizer_id
    other.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL", home)
    assert load_checkpoint(uri).checkpoint_id == tokenizer_id
