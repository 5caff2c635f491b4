"""Evaluation: held-out metrics, the next-frame picture, and the Meta-World policy adapter, which
must hand the model exactly what training read from the lake."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_training_lakes import robot_lake

from gr2.training import checkpoint as ckpt
from gr2.training.data import DataConfig, plan_data
from gr2.training.evaluate import EvalConfig, MetaWorldPolicy, evaluate, heldout_metrics
from gr2.training.loop import TrainConfig, checkpoint_meta, model_config_for
from gr2.training.model import GR2

SMALL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vae_n_embd": 32, "vae_n_head": 2, "vae_n_layer": 1,
         "history": 2, "chunk": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Meta-World shaped lake (corner camera, recorder state layout, 4-d commands) and a checkpoint
    of an untrained model written as the training loop writes one."""
    torch.set_num_threads(1)
    lake = robot_lake(str(tmp_path_factory.mktemp("eval") / "lake"), episodes=4, length=10, cameras=("corner",))
    config = TrainConfig(stage="finetune", model=SMALL, data=DataConfig(action_column="source_action",
                                                                        state_dims=(0, 1, 2, 7)))
    spec = plan_data(lake, "finetune", 2, 2, config.data)
    torch.manual_seed(0)
    model = GR2(model_config_for(config, spec))
    directory = f"{lake.root}/models/gr2/test-run/step-000001"
    ckpt.save_checkpoint(model, directory, meta=checkpoint_meta({"run_id": "test-run", "init": None}, spec, config, 1, {}))
    return lake, directory, spec


def test_held_out_metrics_cover_tokens_and_actions_in_their_own_units(trained):
    lake, directory, spec = trained
    out = heldout_metrics(ckpt.load_checkpoint(directory).model, spec, EvalConfig(batch_size=4))
    assert out["heldout_samples"] == 10 * len(spec.heldout_ids)
    assert 0 <= out["token_accuracy"] <= 1 and out["loss_image"] > 0 and out["action_l1_units"] > 0


def test_evaluate_writes_the_next_frame_picture_and_rolls_out_in_meta_world(trained, tmp_path):
    lake, directory, spec = trained
    out = evaluate(lake.root, None, EvalConfig(episodes=1, max_steps=8, videos=1, batch_size=4), str(tmp_path))
    assert out["checkpoint"] == directory and out["stage"] == "finetune"  # the latest, found by itself
    picture = Image.open(out["next_frames_png"])
    assert picture.size == (3 * 16 * 16, 4 * 16 * 16)  # context | predicted | truth, 4 windows, 16x upscaled
    loop = out["closed_loop"]
    assert loop["env_name"] == "drawer-open-v3" and loop["episodes"] == 1 and loop["steps"] == [8]
    assert loop["success_rate"] == 0.0 and os.path.getsize(loop["videos"][0]) > 0
    assert os.path.exists(os.path.join(tmp_path, "eval.json"))


def test_the_policy_sees_frames_and_state_as_training_read_them_and_acts_in_meta_worlds_units(trained):
    lake, directory, spec = trained
    tokenizer_dir = spec.tokenizer_path
    policy = MetaWorldPolicy(directory, tokenizer_dir)
    rendered = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    obs = {"observation.images.corner": rendered, "observation.state": np.array([0.1, 0.6, 0.2, 1.0], np.float32)}
    as_recorded = np.array(Image.fromarray(rendered[::-1]).resize((16, 16), Image.BILINEAR))  # flipped, resized
    expected = policy.tokenizer.encode(as_recorded[None].transpose(0, 3, 1, 2)).flatten(1)
    action = policy(obs)
    assert torch.equal(policy.episodes[0].frames[-1], expected)
    stats = spec.stats["state"]
    assert np.allclose(policy.episodes[0].states[-1], (np.array([0.1, 0.6, 0.2, 1.0]) - stats["mean"]) / np.asarray(stats["std"]),
                       atol=1e-5)
    assert action.shape == (4,) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
    assert action[-1] in (-1.0, 1.0)
    policy.reset()
    assert len(policy.episodes[0].frames) == 0


def test_a_strided_policy_keeps_the_window_training_read(trained, tmp_path):
    """frame_stride 3, history 2: the model sees the step 3 back (the first step, marked padding,
    until the episode reaches that far), as gr2.robot.actions.window_indices clamps in training."""
    lake, directory, spec = trained
    meta = ckpt.read_meta(directory)
    strided = str(tmp_path / "strided" / "step-000001")
    ckpt.save_checkpoint(ckpt.load_checkpoint(directory).model, strided, meta={
        **{k: v for k, v in meta.items() if k not in ("format", "checkpoint_id", "model", "saved_at",
                                                       "optimizer_param_groups")},
        "data": {**meta["data"], "frame_stride": 3}})
    policy = MetaWorldPolicy(strided, spec.tokenizer_path)
    seen = []
    policy.model.select_action = lambda obs: (seen.append(obs), torch.zeros(1, 2, 4))[1]
    rng = np.random.default_rng(1)
    for _ in range(5):
        policy({"observation.images.corner": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                "observation.state": rng.normal(size=4).astype(np.float32)})
    assert len(policy.episodes[0].frames) == 4  # (history - 1) * stride + 1 steps are kept
    assert [o["step_is_pad"].tolist() for o in seen] == [[[True, False]]] * 3 + [[[False, False]]] * 2
    assert torch.equal(seen[2]["frames"][0, 0], seen[0]["frames"][0, 1])  # step 2 still leans on step 0
    assert torch.equal(seen[4]["frames"][0, 0], seen[1]["frames"][0, 1])  # step 4 sees step 1
    assert torch.equal(seen[4]["frames"][0, 1], policy.episodes[0].frames[-1])


def test_a_checkpoint_whose_tokenizer_left_the_lake_cannot_be_evaluated(trained, tmp_path):
    from gr2.training.evaluate import EvaluationError

    lake, directory, spec = trained
    meta = ckpt.read_meta(directory)
    other = robot_lake(str(tmp_path / "other"), episodes=2, length=4, cameras=("corner",), tokenizer_seed=1)
    moved = str(tmp_path / "other" / "models" / "gr2" / "x" / "step-000001")
    loaded = ckpt.load_checkpoint(directory)
    ckpt.save_checkpoint(loaded.model, moved, meta={**{k: v for k, v in meta.items() if k not in (
        "format", "checkpoint_id", "model", "saved_at", "optimizer_param_groups")}, "tokenizer_path": None})
    with pytest.raises(EvaluationError, match=meta["tokenizer_id"]):
        evaluate(other.root, moved, EvalConfig(episodes=0))


@pytest.mark.parametrize("replan_every", [1, 2])
def test_a_batch_of_episodes_gets_the_actions_each_would_get_alone(trained, replan_every):
    """act() runs the model once for every episode that re-plans; each episode's actions are the
    ones a policy playing it alone returns, although the episodes end at different steps."""
    lake, directory, spec = trained
    rng = np.random.default_rng(2)
    steps = {0: 5, 1: 3, 2: 4}  # episode -> its length
    seen = {i: [{"observation.images.corner": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                 "observation.state": rng.normal(size=4).astype(np.float32)} for _ in range(n)] for i, n in steps.items()}
    batched = MetaWorldPolicy(directory, spec.tokenizer_path, replan_every=replan_every)
    batched.reset(len(steps))
    together = {i: [] for i in steps}
    for t in range(max(steps.values())):
        for i, action in batched.act({i: seen[i][t] for i in steps if t < steps[i]}).items():
            together[i].append(action)
    alone = MetaWorldPolicy(directory, spec.tokenizer_path, replan_every=replan_every)
    for i in steps:
        alone.reset()
        np.testing.assert_allclose(np.stack([alone(o) for o in seen[i]]), np.stack(together[i]), atol=1e-5)
    assert not np.allclose(together[0][0], together[1][0]), "different observations, different actions"
