"""Language reaches the model: every caption and instruction is stored in the lake with its text
embedding and text model, training reads those vectors, and a model told two instructions over the
same observation does two different things, after a save and a load in another process too."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_robot_readers import write_lerobot_v2
from test_training_lakes import (
    GRID,
    METAWORLD_LAYOUTS,
    TEXT_MODEL,
    robot_lake,
    save_tokenizer,
    step_tokens,
    text_columns,
    text_embedder,
)

from gr2.lake.lake import Lake
from gr2.robot.ingest import IngestConfig, ingest, instruction_columns
from gr2.training import checkpoint as ckpt
from gr2.training.data import DataConfig, TrainingDataError, collate, iter_batches, iter_samples, plan_data
from gr2.training.evaluate import EvaluationError, data_spec_for
from gr2.training.loop import TrainConfig, check_init, checkpoint_meta, make_optimizer, model_config_for
from gr2.training.model import GR2
from gr2.video.build import lake_rows
from gr2.video.embed import ClipEmbedder

SMALL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vae_n_embd": 32, "vae_n_head": 2, "vae_n_layer": 1,
         "history": 2, "chunk": 2}
LEFT, RIGHT = "push the block to the left", "push the block to the right"


def test_two_ingests_store_each_instruction_embedded_identically_with_its_text_model(ray_local, tmp_path):
    source = write_lerobot_v2(tmp_path / "v2", lengths=(6, 6))
    config = IngestConfig(concurrency=1)
    rows = []
    for name in ("a", "b"):
        lake = Lake(str(tmp_path / name))
        assert ingest([str(source)], lake, config).funnel["accepted"] == 2
        rows.append(lake.read("episodes").sort_by("episode_id").to_pylist())
    first, second = rows
    assert [r["instruction"] for r in first] == ["stack the cups"] * 2
    assert all((r["text_model"], r["text_pretrained"]) == TEXT_MODEL for r in first + second)
    vectors = [np.asarray(r["instruction_embedding"], np.float32) for r in first + second]
    assert vectors[0].shape == (512,) and abs(float(np.linalg.norm(vectors[0])) - 1) < 1e-5
    assert all(np.array_equal(v, vectors[0]) for v in vectors)  # bit-equal, across episodes and ingests
    assert config.hash() != IngestConfig(text_pretrained="laion2b_s34b_b79k").hash()  # the text model shapes rows
    # an episode without an instruction stores no embedding and no text model
    assert instruction_columns(None, text_embedder()) == \
        {"instruction_embedding": None, "text_model": None, "text_pretrained": None}


def test_the_embed_stage_stores_every_caption_embedding_and_nulls_without_a_caption():
    n = 3
    batch = {"clip_id": np.array(["a", "b", "c"]), "status": np.array(["accepted", "failed", "accepted"], dtype=object),
             "video_id": np.array(["v"] * n), "build_id": np.array(["b"] * n), "reason": np.array([""] * n, dtype=object),
             "caption": np.array(["a dog runs", "a cat sleeps", ""], dtype=object),
             "frames": np.random.default_rng(0).integers(0, 255, (n, 2, 32, 32, 3), dtype=np.uint8)}
    rows = lake_rows(ClipEmbedder()(batch)).to_pylist()
    stored = text_embedder()(["a dog runs", "a cat sleeps"])
    for row, vector in zip(rows[:2], stored):  # a failed clip's caption is embedded too: the text is there
        assert (row["text_model"], row["text_pretrained"]) == TEXT_MODEL
        assert np.allclose(row["caption_embedding"], vector, atol=1e-6)
    assert rows[2]["caption_embedding"] is None and rows[2]["text_model"] is None and rows[2]["text_pretrained"] is None


def test_a_lake_embedded_by_two_text_models_is_refused_naming_both(tmp_path):
    lake = robot_lake(str(tmp_path / "lake"), episodes=4, length=4)
    lake.update("episodes", pa.table({"episode_id": ["ep001"], "text_model": ["ViT-B-16"],
                                      "text_pretrained": ["laion2b_s34b_b88k"]}))
    with pytest.raises(TrainingDataError) as e:
        plan_data(lake, "finetune", 2, 2, DataConfig())
    assert "ViT-B-32 weights 'none'" in str(e.value) and "ViT-B-16 weights 'laion2b_s34b_b88k'" in str(e.value)


def two_instruction_lake(root: str) -> Lake:
    """Two episodes seeing the same frames and states, one told LEFT and moving -x with the gripper
    open, the other told RIGHT and moving +x with it closed."""
    lake = Lake(root)
    _, tokenizer_id = save_tokenizer(lake.root)
    length, episodes, steps = 8, [], []
    for e, (instruction, sign) in enumerate(((LEFT, -1.0), (RIGHT, 1.0))):
        eid = f"ep{e:03d}"
        for t in range(length):
            steps.append({
                "step_id": f"{eid}:{t:06d}", "episode_id": eid, "dataset": "test", "step": t, "timestamp_s": t * 0.05,
                "state": [0.0, 0.6, 0.2, 0.0, 0.0, 0.0, 1.0, 1.0],
                "action": None if t == length - 1 else [sign * 0.01, 0.0, 0.0, 0.0, 0.0, 0.0, sign],
                "source_action": [sign, 0.0, 0.0, sign],
                "views": [{"camera": "corner", "ok": True, "jpeg": b"\xff\xd8", "frame_index": t, "timestamp_s": t * 0.05,
                           "skew_s": 0.0, "tokens": step_tokens(0, t, 0), "token_shape": list(GRID)}],
                "flags": [], "build_id": "test"})
        episodes.append({"episode_id": eid, "source": "test", "episode_key": str(e), "format": "lerobot",
                         "dataset": "test", "instruction": instruction, **text_columns(instruction, "instruction_embedding"),
                         "status": "accepted", "length": length, "state_dim": 8, "action_dim": 7,
                         "action_space": "ee_delta", **METAWORLD_LAYOUTS, "cameras": ["corner"], "frame_width": 16,
                         "frame_height": 16,
                         "tokenizer_id": tokenizer_id, "build_id": "test"})
    lake.commit("steps", steps)
    lake.commit("episodes", episodes)
    return lake


# Run in a process of its own: load the checkpoint, take each instruction's embedding as the policy
# does (the lake's stored vector, and the recorded text model rebuilt), and act on the same window.
ACT = """
import json, sys
import numpy as np, torch
from gr2.training import checkpoint as ckpt
from gr2.training.evaluate import instruction_embedding
directory, lake, window = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
loaded = ckpt.load_checkpoint(directory)
out = {}
for text in window["texts"]:
    stored = instruction_embedding(loaded.meta, text, lake)
    rebuilt = instruction_embedding(loaded.meta, text, None)
    obs = {k: torch.as_tensor(np.asarray(window[k])) for k in ("frames", "state", "step_is_pad")}
    obs["text_embedding"] = torch.as_tensor(stored)[None]
    out[text] = {"action": loaded.model.select_action(obs)[0, 0].tolist(), "stored": stored.tolist(),
                 "rebuilt_equal": bool(np.array_equal(stored, rebuilt))}
print(json.dumps(out))
"""


def test_two_instructions_over_the_same_observation_get_different_actions_before_and_after_a_reload(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    lake = two_instruction_lake(str(tmp_path / "lake"))
    config = TrainConfig(stage="finetune", model=SMALL, data=DataConfig(holdout=0.0, shuffle_buffer=64), lr=1e-3)
    spec = plan_data(lake, "finetune", 2, 2, config.data)
    assert spec.text == {"model": "ViT-B-32", "pretrained": "none", "dim": 512}
    model_config = model_config_for(config, spec)
    assert model_config.clip_model is None and model_config.text_dim == 512  # vectors from the lake, no tower
    model = GR2(model_config).train()
    optimizer = make_optimizer(model, config)
    batches = iter_batches(spec, 16)
    for _ in range(200):
        out = model(next(batches))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    model.eval()

    # the same window (frames, state) of each episode: only the instruction tells them apart
    by_episode = {s["id"]: s for s in iter_samples(spec, epochs=1, shuffle=False)}
    left, right = by_episode["ep000@4"], by_episode["ep001@4"]
    assert np.array_equal(left["frames"], right["frames"]) and np.array_equal(left["state"], right["state"])
    stored = {text: text_embedder()([text])[0] for text in (LEFT, RIGHT)}
    assert np.array_equal(left["text_embedding"], stored[LEFT]) and np.array_equal(right["text_embedding"], stored[RIGHT])
    with torch.no_grad():
        actions = model.select_action(collate([left, right]))[:, 0].numpy()
    assert actions[0, 0] < 0 < actions[1, 0]  # arm: -x for LEFT, +x for RIGHT
    assert actions[0, -1] < 0 < actions[1, -1]  # gripper: open for LEFT, closed for RIGHT

    directory = f"{lake.root}/models/gr2/language/step-000200"
    ckpt.save_checkpoint(model, directory, meta=checkpoint_meta({"run_id": "language", "init": None}, spec, config, 200, {}))
    assert ckpt.read_meta(directory)["text"] == spec.text
    window = {"texts": [LEFT, RIGHT], "frames": left["frames"][None].tolist(), "state": left["state"][None].tolist(),
              "step_is_pad": left["step_is_pad"][None].tolist()}
    done = subprocess.run([sys.executable, "-c", ACT, directory, lake.root, json.dumps(window)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    for text, expected in ((LEFT, actions[0]), (RIGHT, actions[1])):
        assert np.array_equal(np.asarray(reloaded[text]["stored"], np.float32), stored[text])
        assert reloaded[text]["rebuilt_equal"]  # a new instruction rebuilt through the recorded text model matches
        assert np.allclose(reloaded[text]["action"], expected, atol=1e-5)
    assert reloaded[LEFT]["action"][0] < 0 < reloaded[RIGHT]["action"][0]


def test_init_and_evaluation_on_a_lake_of_another_text_model_are_refused_naming_both(tmp_path):
    lake = robot_lake(str(tmp_path / "lake"), episodes=3, length=4, cameras=("corner",))
    config = TrainConfig(stage="finetune", model=SMALL)
    spec = plan_data(lake, "finetune", 2, 2, config.data)
    directory = f"{lake.root}/models/gr2/other/step-000001"
    other = {"model": "ViT-L-14", "pretrained": "none", "dim": 768}
    ckpt.save_checkpoint(GR2(model_config_for(config, spec)), directory,
                         meta={**checkpoint_meta({"run_id": "other", "init": None}, spec, config, 1, {}), "text": other})
    with pytest.raises(ckpt.CheckpointError) as e:  # fine-tuning from it
        check_init(directory, spec, model_config_for(config, spec))
    assert "ViT-L-14 weights 'none' (768-d)" in str(e.value) and "ViT-B-32 weights 'none' (512-d)" in str(e.value)
    with pytest.raises(EvaluationError) as e:
        data_spec_for(lake, ckpt.read_meta(directory))
    assert "ViT-L-14" in str(e.value) and "ViT-B-32" in str(e.value)
