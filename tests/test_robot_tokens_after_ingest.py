"""The README's order, as written: ingest robot episodes, train the tokenizer, tokenize, fine-tune.

Ingest cannot tokenize before a tokenizer exists, and a re-run of ingest skips accepted episodes:
`gr2 tokenize` must give the steps their tokens, or the lake never fine-tunes.
"""

from __future__ import annotations

import json

import pyarrow.compute as pc
from test_robot_readers import write_lerobot_v2

from gr2.lake.lake import Lake


def _gr2(*argv: str) -> str:
    """`gr2 ARGV` through the real command line, its output; a non-zero exit fails the test."""
    from gr2.flows import cli

    args = cli.parser().parse_args(list(argv))
    return args.run(args)


def test_ingest_then_train_tokenizer_then_tokenize_ends_in_a_fine_tune(ray_local, prefect_server, tmp_path):
    data = write_lerobot_v2(tmp_path / "robot", lengths=(12, 10, 11))
    lake = str(tmp_path / "lake")
    _gr2("ingest-robot", "--lake", lake, str(data))
    the_lake = Lake(lake)
    assert set(the_lake.read("episodes").column("tokenizer_id").to_pylist()) == {None}

    _gr2("train-tokenizer", "--lake", lake, "--resolution", "32", "--codebook", "64", "--steps", "6",
         "--batch-size", "8", "--set", "channel_mult=[1,1,2,2]")
    said = _gr2("tokenize", "--lake", lake)
    assert "3 robot episodes' steps tokenized" in said

    episodes = the_lake.read("episodes", columns=["tokenizer_id"])
    [tid] = set(episodes.column("tokenizer_id").to_pylist())
    assert tid is not None
    views = the_lake.read("steps", columns=["views"]).column("views").to_pylist()
    grids = [v["tokens"] for step in views for v in step if v["ok"]]
    assert grids and all(g is not None and len(g) == 16 for g in grids)  # 32x32 frames, f=8: 4x4 tokens

    again = _gr2("tokenize", "--lake", lake)
    assert "0 robot episodes' steps tokenized, 3 already were" in again

    out = json.loads(_gr2("train", "--lake", lake, "--stage", "finetune", "--steps", "2", "--batch-size", "2",
                          "--json"))
    assert out["stage"] == "finetune" and out["steps"] == 2
    assert Lake(lake).checkpoints("gr2")  # a fine-tuned checkpoint in the lake's registry


def test_steps_of_one_episode_keep_their_frames_and_gain_tokens(ray_local, tmp_path):
    from gr2.robot.ingest import IngestConfig, ingest
    from gr2.robot.tokens import tokenize_steps
    from gr2.tokenizers import Tokenizer, TokenizerConfig, save_checkpoint

    data = write_lerobot_v2(tmp_path / "robot", lengths=(8,))
    lake = Lake(str(tmp_path / "lake"))
    ingest([str(data)], lake, IngestConfig())
    before = lake.read("steps", columns=["step_id", "views"]).sort_by("step_id").to_pylist()
    directory = str(tmp_path / "tok")
    save_checkpoint(Tokenizer(TokenizerConfig(resolution=32, codebook_size=64, channel_mult=(1, 1, 2, 2))), directory)

    result = tokenize_steps(lake, directory)
    assert (result.tokenized, result.failed, result.episodes) == (1, 0, 1)
    after = lake.read("steps", columns=["step_id", "views"]).sort_by("step_id").to_pylist()
    assert [s["step_id"] for s in after] == [s["step_id"] for s in before]
    for old, new in zip(before, after):
        for a, b in zip(old["views"], new["views"]):
            assert a["jpeg"] == b["jpeg"] and a["ok"] == b["ok"]
            assert (b["tokens"] is not None) == b["ok"]
    assert pc.all(pc.equal(lake.read("episodes")["tokenizer_id"], result.tokenizer_id)).as_py()
