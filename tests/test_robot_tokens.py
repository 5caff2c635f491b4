"""The token-grid hook: with a tokenizer checkpoint, every aligned view of every step gets its grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gr2.robot.ingest import EpisodeRows, IngestConfig, _from_ipc, _ref_item, list_sources, process_episode
from gr2.video.tokenize import FrameTokenizer

SAMPLES = Path(__file__).parent / "data" / "robot"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, str]:
    """A small random-init tokenizer (f=8, 256 codes) saved as a checkpoint; (directory, id)."""
    import torch

    from gr2.tokenizers import Tokenizer, TokenizerConfig, save_checkpoint

    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(resolution=64, downsample=8, channels=8, z_channels=16, codebook_size=256, code_dim=8))
    directory = str(tmp_path_factory.mktemp("tok") / "ckpt")
    return directory, save_checkpoint(tok, directory, info={"note": "random init, for tests"})


def test_frames_become_uint16_grids_named_by_their_checkpoint(checkpoint):
    directory, cid = checkpoint
    tok = FrameTokenizer(directory)
    grids = tok(np.random.default_rng(0).integers(0, 255, (3, 64, 48, 3), dtype=np.uint8))
    assert tok.checkpoint_id == cid and grids.shape == (3, 8, 6) and grids.max() < 256


def test_the_ray_stage_writes_token_grids_for_every_aligned_view(checkpoint):
    directory, cid = checkpoint
    refs, _ = list_sources([str(SAMPLES / "xhand")])
    config = IngestConfig(frame_width=64, frame_height=64, tokenizer=directory, cameras=("0", "2"))
    stage = EpisodeRows(config, "test-build", done={}, offsets={}, offset_errors={})  # what each Ray actor runs
    out = stage(pa.Table.from_pylist([_ref_item(refs[0])])).to_pylist()[0]
    assert out["status"] == "accepted"
    episode, steps = _from_ipc(out["episode"]), _from_ipc(out["steps"])
    assert episode.column("tokenizer_id")[0].as_py() == cid
    views = steps.column("views")[10].as_py()
    assert [v["camera"] for v in views] == ["0", "2"]
    for v in views:
        assert v["token_shape"] == [8, 8] and len(v["tokens"]) == 64 and max(v["tokens"]) < 256
    assert steps.schema.field("views").type.value_type.field("tokens").type == pa.list_(pa.uint16())


def test_without_a_tokenizer_the_token_columns_stay_empty():
    refs, _ = list_sources([str(SAMPLES / "rt1")])
    row, steps = process_episode(refs[0], IngestConfig(), "test")
    assert row["tokenizer_id"] is None
    assert all(v["tokens"] is None and v["token_shape"] is None for v in steps.column("views")[0].as_py())


def test_token_ids_beyond_uint16_fail_the_episode_rather_than_wrap():
    class Huge:
        checkpoint_id = "huge"

        def __call__(self, frames):
            return np.full((len(frames), 2, 2), 70_000)

    refs, _ = list_sources([str(SAMPLES / "rt1")])
    row, steps = process_episode(refs[0], IngestConfig(), "test", tokenizer=Huge())
    assert row["status"] == "failed" and "token ids outside uint16" in row["reason"] and steps is None
