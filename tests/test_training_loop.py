"""A few real fine-tuning steps through Ray Train on one worker. (Resuming after a kill:
test_training_distributed.py.)"""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file
from test_training_lakes import robot_lake

from gr2.training import checkpoint as ckpt
from gr2.training.data import DataConfig
from gr2.training.loop import TrainConfig, train
from gr2.training.metrics import read_metrics

SMALL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vae_n_embd": 32, "vae_n_head": 2, "vae_n_layer": 1,
         "history": 2, "chunk": 2}


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    return robot_lake(str(tmp_path_factory.mktemp("loop") / "lake"), episodes=4, length=10)


def config(steps: int) -> TrainConfig:
    return TrainConfig(stage="finetune", model=SMALL, data=DataConfig(shuffle_buffer=16), steps=steps, batch_size=4,
                       checkpoint_every=2, report_every=2, warmup_steps=2)


def test_one_worker_fine_tunes_through_ray_train_and_checkpoints_with_its_optimizer(ray_local, lake):
    result = train(lake, config(4))
    assert result.steps == 4 and result.resumed_from == 0 and result.workers == 1
    assert {"loss", "loss_arm", "loss_gripper", "loss_kl", "loss_image", "token_accuracy", "action_l1",
            "samples_per_s", "tokens_per_s"} <= set(result.metrics)
    assert [r["step"] for r in read_metrics(result.run_dir)] == [1, 2, 3, 4]
    assert [os.path.basename(c) for c in ckpt.list_checkpoints(result.run_dir)] == ["step-000002", "step-000004"]
    meta = ckpt.read_meta(result.checkpoint)
    assert meta["tokenizer_id"] and meta["stats"]["action"]["mean"] and meta["data"]["cameras"] == ["corner", "gripperPOV"]
    adam = load_file(os.path.join(result.checkpoint, "optimizer.safetensors"))
    assert float(adam["state.0.step"]) == 4
    with open(os.path.join(result.run_dir, "run.json")) as f:
        assert json.load(f)["train_items"] >= 3

    again = train(lake, config(4))  # the same command: the run is found finished, nothing retrains
    assert again.run_id == result.run_id and again.checkpoint_id == result.checkpoint_id
