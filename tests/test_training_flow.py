"""`gr2 train` and `gr2 evaluate`: the Prefect flows on Ray Train, their artifacts, and requests
that fail with one line before any training starts."""

from __future__ import annotations

import pytest
from test_training_lakes import clips_lake, robot_lake, save_tokenizer

from gr2.flows import cli

SMALL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vae_n_embd": 32, "vae_n_head": 2, "vae_n_layer": 1,
         "history": 2, "chunk": 2}


@pytest.fixture
def gr2():
    """`gr2 ARGS...` as cli.main runs it, in this process: (exit code, what it prints, its error line).

    Not through cli.main itself: Prefect's log handlers keep the first test's captured stderr."""
    def run(*argv: str) -> tuple[int, str, str]:
        args = cli.parser().parse_args(list(argv))
        try:
            return 0, args.run(args), ""
        except Exception as e:
            if not cli._is_user_error(e):
                raise
            return 2, "", f"gr2 {args.command}: error: {cli._one_line(e)}"

    return run


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("config") / "train.yaml"
    path.write_text(yaml.safe_dump({"model": SMALL, "batch_size": 4, "checkpoint_every": 1, "warmup_steps": 1,
                                    "data": {"cameras": ["corner"]}}))
    return str(path)


def test_gr2_train_runs_the_flow_on_ray_train_and_leaves_its_artifacts(ray_local, prefect_server, gr2, tmp_path, config_file):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    lake = robot_lake(str(tmp_path / "lake"), episodes=3, length=8)
    code, out, err = gr2("train", "--lake", lake.root, "--stage", "finetune", "--steps", "2", "--config", config_file)
    assert code == 0, err
    assert "### finetune run `finetune-tiny-" in out and "at step 2" in out and "| loss_arm |" in out
    with get_client(sync_client=True) as client:
        curve = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finetune-loss-curve"])))
    assert curve and [row["step"] for row in _table(curve[-1].data)] == [1, 2]


def _table(data):
    import json

    return json.loads(data) if isinstance(data, str) else data


def test_a_lake_without_tokens_fails_in_one_line(ray_local, prefect_server, gr2, tmp_path):
    lake = clips_lake(str(tmp_path / "lake"), clips=2, tokens=False)
    code, _, err = gr2("train", "--lake", lake.root, "--stage", "pretrain", "--steps", "1")
    assert code == 2 and err.startswith("gr2 train: error: lake ") and "has no tokens in clips.lance" in err


def test_more_workers_than_the_cluster_has_fail_in_one_line(ray_local, prefect_server, gr2, tmp_path):
    lake = robot_lake(str(tmp_path / "lake"), episodes=2, length=4)
    code, _, err = gr2("train", "--lake", lake.root, "--stage", "finetune", "--workers", "4", "--batch-size", "4")
    assert code == 2 and "4 workers x 1 CPU need 4 CPUs; the Ray cluster has 2" in err


def test_a_checkpoint_of_another_tokenizer_fails_in_one_line(ray_local, prefect_server, gr2, tmp_path, config_file):
    from gr2.training import checkpoint as ckpt
    from gr2.training.model import GR2, GR2Config

    lake = robot_lake(str(tmp_path / "lake"), episodes=2, length=4)
    _, other_id = save_tokenizer(str(tmp_path / "elsewhere"), codebook=128, seed=3)
    model = GR2(GR2Config.named("tiny", codebook_size=128, grid_h=2, grid_w=2, **SMALL))
    foreign = ckpt.save_checkpoint(model, str(tmp_path / "foreign"), meta={"tokenizer_id": other_id, "step": 9})
    code, _, err = gr2("train", "--lake", lake.root, "--stage", "finetune", "--init", str(tmp_path / "foreign"),
                       "--config", config_file)
    assert code == 2 and f"checkpoint {foreign} was trained on tokens of tokenizer {other_id} (codebook 128)" in err


def test_evaluate_without_a_checkpoint_says_to_train_first(prefect_server, gr2, tmp_path):
    lake = robot_lake(str(tmp_path / "lake"), episodes=2, length=4)
    code, _, err = gr2("evaluate", "--lake", lake.root)
    assert code == 2 and "has no GR-2 checkpoint" in err and "train one first" in err
