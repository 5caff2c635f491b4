"""Training data straight from Lance: windows, shards, shuffling, held-out items, and the lakes
(and requests) that are refused before any training starts."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from test_training_lakes import (
    CODES,
    GRID,
    INSTRUCTION,
    clips_lake,
    robot_lake,
    save_tokenizer,
    step_tokens,
    text_embedder,
)

from gr2.training import checkpoint as ckpt
from gr2.training.data import DataConfig, TrainingDataError, iter_batches, iter_samples, plan_data, shuffle_buffer
from gr2.training.loop import TrainConfig, TrainingConfigError, check_resources, plan
from gr2.training.model import GR2, GR2Config


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    return robot_lake(str(tmp_path_factory.mktemp("robot") / "lake"), episodes=6, length=10,
                      flagged={(1, 4): "gripperPOV"})


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return clips_lake(str(tmp_path_factory.mktemp("clips") / "lake"), clips=12, frames=5)


def finetune_spec(lake, history=3, chunk=2, **data):
    return plan_data(lake, "finetune", history, chunk, DataConfig(holdout=0.2, **data))


def test_a_fine_tuning_window_holds_history_views_state_and_action_chunks(robot):
    spec = finetune_spec(robot)
    assert spec.cameras == ("corner", "gripperPOV") and spec.grid == GRID and spec.codebook_size == CODES
    assert (spec.state_dim, spec.action_dim) == (8, 7) and len(spec.heldout_ids) >= 1
    samples = {s["id"]: s for s in iter_samples(spec, epochs=1, shuffle=False)}
    episode = next(i for i in spec.train_ids if i != "ep001")  # one without a flagged view
    e = int(episode[2:])
    s = samples[f"{episode}@5"]
    assert s["frames"].shape == (3, 2, 4) and s["state"].shape == (3, 8) and s["action"].shape == (3, 2, 7)
    assert [list(s["frames"][i, v]) for i in range(3) for v in range(2)] == \
        [step_tokens(e, t, v) for t in (3, 4, 5) for v in range(2)]
    assert not s["step_is_pad"].any() and not s["action_is_pad"].any()
    assert s["text_embedding"].dtype == np.float32 and np.array_equal(s["text_embedding"], text_embedder()([INSTRUCTION])[0])
    first = samples[f"{episode}@0"]  # early history repeats step 0 and says so
    assert first["step_is_pad"].tolist() == [True, True, False]
    assert [list(first["frames"][i, 0]) for i in range(3)] == [step_tokens(e, 0, 0)] * 3
    last = samples[f"{episode}@9"]  # past the end, and the last step's null ee_delta action, are padding
    assert last["action_is_pad"][-1].tolist() == [True, True] and last["action_is_pad"][-2].tolist() == [False, True]


def test_a_frame_stride_reads_history_steps_that_far_apart(robot):
    spec = finetune_spec(robot, frame_stride=3)
    samples = {s["id"]: s for s in iter_samples(spec, epochs=1, shuffle=False)}
    episode = next(i for i in spec.train_ids if i != "ep001")
    e = int(episode[2:])
    s = samples[f"{episode}@8"]
    assert [list(s["frames"][i, 0]) for i in range(3)] == [step_tokens(e, t, 0) for t in (2, 5, 8)]
    assert not s["step_is_pad"].any()
    assert samples[f"{episode}@4"]["step_is_pad"].tolist() == [True, False, False]  # 4-6 < 0: step 0, marked
    config = TrainConfig(stage="finetune", data=DataConfig(frame_stride=3))
    assert config.shaping()["data"]["frame_stride"] == 3
    assert "frame_stride" not in TrainConfig(stage="finetune").shaping()["data"]  # older runs keep their ids


def test_arm_actions_are_normalised_and_the_gripper_keeps_its_sign(robot):
    spec = finetune_spec(robot)
    actions = np.concatenate([s["action"][-1, :1] for s in iter_samples(spec, epochs=1, shuffle=False)
                              if not s["action_is_pad"][-1, 0]])
    assert set(np.unique(actions[:, -1])) == {-1.0, 1.0}
    assert np.abs(actions[:, :3].mean(0)).max() < 0.3 and np.allclose(actions[:, 3:6], 0)
    assert np.abs(actions[:, :3].std(0) - 1).max() < 0.3


def test_state_dims_and_the_action_column_are_chosen_by_config(robot):
    spec = finetune_spec(robot, state_dims=(0, 1, 2, 7), action_column="source_action", cameras=("corner",))
    s = next(iter_samples(spec, epochs=1, shuffle=False))
    assert s["state"].shape == (3, 4) and s["action"].shape == (3, 2, 4) and s["frames"].shape == (3, 1, 4)


def test_a_window_that_needs_a_flagged_view_is_skipped_never_filled(robot):
    spec = finetune_spec(robot)
    assert "ep001" in spec.train_ids  # the hash split is fixed: ep000 is the held-out one
    ids = {s["id"] for s in iter_samples(spec, epochs=1, shuffle=False)}
    # history 3: the windows ending at steps 4, 5 and 6 need step 4's wrist view
    assert {"ep001@4", "ep001@5", "ep001@6"}.isdisjoint(ids) and {"ep001@3", "ep001@7"} <= ids
    one_view = finetune_spec(robot, cameras=("corner",))
    assert "ep001@4" in {s["id"] for s in iter_samples(one_view, epochs=1, shuffle=False)}


def test_ranks_read_disjoint_episodes_that_cover_the_training_split(robot):
    spec = finetune_spec(robot)
    per_rank = [{s["id"].split("@")[0] for s in iter_samples(spec, rank, 2, epochs=1, seed=3)} for rank in (0, 1)]
    assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == set(spec.train_ids)
    held = {s["id"].split("@")[0] for s in iter_samples(spec, split="heldout", epochs=1)}
    assert held == set(spec.heldout_ids) and held.isdisjoint(spec.train_ids)


def test_pretraining_reads_every_window_of_every_tokenized_clip_once_across_ranks(clips):
    spec = plan_data(clips, "pretrain", 3, 0, DataConfig(holdout=0.2, clips_per_read=2))
    assert spec.grid == GRID and "rejected" not in spec.train_ids + spec.heldout_ids
    per_rank = [[s["id"] for s in iter_samples(spec, rank, 2, epochs=1)] for rank in (0, 1)]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"{c}@{i}" for c in spec.train_ids for i in range(3))
    s = next(iter_samples(spec, epochs=1))
    assert s["frames"].shape == (3, 1, 4) and np.array_equal(s["frames"][1], (s["frames"][0] + 1) % CODES)
    caption = f"clip {int(s['id'].split('@')[0][4:]) % 3}"  # clips_lake's captions
    assert np.array_equal(s["text_embedding"], text_embedder()([caption])[0])


def test_the_unigram_entropy_is_that_of_the_training_tokens(clips):
    spec = plan_data(clips, "pretrain", 2, 0, DataConfig(holdout=0.0))
    values = np.concatenate([np.asarray(r["tokens"]) for r in clips.dataset("clips").to_table(
        filter="tokens IS NOT NULL").to_pylist()])
    p = np.bincount(values, minlength=CODES) / len(values)
    assert spec.unigram_entropy_nats == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum())


def test_batches_are_torch_tensors_of_the_per_rank_size(robot):
    batch = next(iter_batches(finetune_spec(robot), 5))
    assert batch["frames"].dtype == torch.int64 and batch["frames"].shape == (5, 3, 2, 4)
    assert batch["state"].dtype == torch.float32 and batch["text_embedding"].shape == (5, 512)


def test_a_global_batch_mixes_as_many_episodes_on_two_ranks_as_on_one(tmp_path):
    # the same loss curve on 1 and 2 workers needs batches alike: the buffer is shared out, not doubled
    lake = robot_lake(str(tmp_path / "lake"), episodes=12, length=10)
    spec = plan_data(lake, "finetune", 2, 2, DataConfig(holdout=0.0, shuffle_buffer=40))

    def episodes_per_batch(world: int, batch: int = 16, steps: int = 40) -> float:
        ranks = [iter_batches(spec, batch // world, rank, world, seed=0) for rank in range(world)]
        return np.mean([len({i.split("@")[0] for r in ranks for i in next(r)["id"]}) for _ in range(steps)])

    one, two = episodes_per_batch(1), episodes_per_batch(2)
    assert 2 < one < 10 and abs(two - one) / one < 0.1  # a whole buffer per rank: 7.5 vs 9.2


def test_the_shuffle_buffer_yields_a_permutation():
    out = list(shuffle_buffer(range(100), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


# -- refused before training ---------------------------------------------------------------------------


def test_a_lake_whose_clips_have_no_tokens_is_refused(tmp_path):
    lake = clips_lake(str(tmp_path / "lake"), clips=3, tokens=False)
    with pytest.raises(TrainingDataError, match="no tokens"):
        plan_data(lake, "pretrain", 2, 0)


def test_a_lake_whose_episodes_have_no_tokens_is_refused(tmp_path):
    lake = robot_lake(str(tmp_path / "lake"), episodes=2, length=4, tokenizer_id=None)
    with pytest.raises(TrainingDataError, match="no tokens in steps.lance"):
        plan_data(lake, "finetune", 2, 2)


def test_a_lake_without_robot_episodes_is_refused_for_fine_tuning(clips):
    with pytest.raises(TrainingDataError, match="no robot episodes"):
        plan_data(clips, "finetune", 2, 2)


def test_tokens_of_a_tokenizer_the_lake_does_not_hold_are_refused(tmp_path):
    lake = robot_lake(str(tmp_path / "lake"), episodes=2, length=4, tokenizer_id="0123456789abcdef")
    with pytest.raises(TrainingDataError, match="0123456789abcdef.*not under"):
        plan_data(lake, "finetune", 2, 2)


def test_more_workers_than_the_cluster_has_is_refused(ray_local):
    with pytest.raises(TrainingConfigError, match="3 workers x 1 CPU need 3 CPUs; the Ray cluster has 2"):
        check_resources(TrainConfig(workers=3, batch_size=6))
    with pytest.raises(TrainingConfigError, match="GPU"):
        check_resources(TrainConfig(workers=1, use_gpu=True))


def test_a_checkpoint_from_another_tokenizer_is_refused(ray_local, tmp_path, robot):
    other = robot_lake(str(tmp_path / "other"), episodes=2, length=6)
    _, other_id = save_tokenizer(other.root, codebook=32, seed=1)
    config = GR2Config.named("tiny", n_layer=1, n_embd=32, n_head=2, codebook_size=32, grid_h=2, grid_w=2,
                             vae_n_embd=32, vae_n_head=2, vae_n_layer=1)
    foreign = ckpt.save_checkpoint(GR2(config), str(tmp_path / "foreign"), meta={"tokenizer_id": other_id, "step": 1})
    with pytest.raises(ckpt.CheckpointError, match=f"tokenizer {other_id} \\(codebook 32\\).*codebook {CODES}"):
        plan(robot, TrainConfig(stage="finetune", init=str(tmp_path / "foreign"), batch_size=2,
                                model={"n_layer": 1, "n_embd": 32, "n_head": 2}))
    assert foreign


# -- checkpoints ---------------------------------------------------------------------------------------


@pytest.fixture
def small_config():
    return GR2Config.named("tiny", n_layer=1, n_embd=32, n_head=2, codebook_size=CODES, grid_h=2, grid_w=2,
                           history=2, chunk=2, vae_n_embd=32, vae_n_head=2, vae_n_layer=1)


def test_a_checkpoint_round_trips_weights_and_optimizer_state(tmp_path, small_config):
    torch.manual_seed(0)
    model = GR2(small_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(dict(frames=torch.randint(0, CODES, (2, 2, 1, 4)), text_embedding=torch.zeros(2, 512)))["loss"].backward()
    opt.step()
    cid = ckpt.save_checkpoint(model, str(tmp_path / "c"), opt, {"step": 1, "stage": "pretrain"})
    loaded = ckpt.load_checkpoint(str(tmp_path / "c"), with_optimizer=True)
    assert loaded.meta["checkpoint_id"] == cid and loaded.meta["step"] == 1
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.model.frame_head.weight is loaded.model.tok_emb.weight  # still tied
    opt2 = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded.optimizer_state)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert ckpt.resolve_checkpoint(str(tmp_path), str(tmp_path / "c")) == str(tmp_path / "c")


def test_a_checkpoint_whose_weights_changed_or_whose_save_was_killed_is_refused(tmp_path, small_config):
    ckpt.save_checkpoint(GR2(small_config), str(tmp_path / "c"))
    (tmp_path / "c" / "model.safetensors").write_bytes((tmp_path / "c" / "model.safetensors").read_bytes()[:-64])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_checkpoint(str(tmp_path / "c"))
    (tmp_path / "c" / "config.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no config.json"):
        ckpt.load_checkpoint(str(tmp_path / "c"))


def test_fine_tuning_starts_from_pretrained_weights_where_they_fit(tmp_path, small_config):
    from dataclasses import replace

    pre = GR2(replace(small_config, n_views=1))
    ckpt.save_checkpoint(pre, str(tmp_path / "pre"))
    fine = GR2(replace(small_config, n_views=2, state_dim=8, action_dim=7))
    report = ckpt.init_from(fine, str(tmp_path / "pre"))
    assert torch.equal(fine.tok_emb.weight, pre.tok_emb.weight) and torch.equal(fine.view_emb[:1], pre.view_emb)
    assert "view_emb" in report["partial"] and "state_arm.weight" in report["skipped"]
    with pytest.raises(ckpt.CheckpointError, match="tok_emb.weight"):
        ckpt.init_from(GR2(replace(small_config, codebook_size=32)), str(tmp_path / "pre"))


def test_a_rank_left_without_samples_says_so_rather_than_waiting_forever(tmp_path):
    lake = clips_lake(str(tmp_path / "lake"), clips=1, frames=3)
    spec = plan_data(lake, "pretrain", 2, 0, DataConfig(holdout=0.0))
    assert next(iter_samples(spec, 0, 2))["frames"].shape == (2, 1, 4)
    with pytest.raises(TrainingDataError, match="rank 1 of 2 has no train samples"):
        next(iter_samples(spec, 1, 2))
