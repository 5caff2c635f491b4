"""Declared state and action layouts: each reader says what every dimension is, the lake stores it, and
normalisation, the model's losses and select_action follow it (a gripper is no longer assumed to be
the last dimension with a -1/+1 sign)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gr2.robot import annotated_json
from gr2.robot import layout as lay
from gr2.robot.ingest import IngestConfig, list_sources, process_episode
from gr2.training.model import GR2, GR2Config

SAMPLES = Path(__file__).parent / "data" / "robot"


def _episode(name: str):
    return annotated_json.load_episode(annotated_json.list_episodes(str(SAMPLES / name))[0])


@pytest.mark.parametrize("name", ["rt1", "bridge"])
def test_rt1_and_bridge_declare_a_continuous_gripper_in_0_1(name):
    ep = _episode(name)
    ep.validate()
    gripper = ep.action_layout[-1]
    assert (gripper.name, gripper.gripper, gripper.low, gripper.high) == ("gripper", "continuous", 0.0, 1.0)
    assert [d.mode for d in ep.action_layout[:6]] == ["delta"] * 6 and ep.action_layout[0].unit == "m"
    assert ep.end_effector.layout == (gripper,)
    # the sample really holds openings between the two ends, which a sign would turn into "closed"
    values = np.asarray(ep.end_effector.effector).ravel()
    assert ((values > 0.05) & (values < 0.95)).any()


def test_xhand_declares_twelve_hand_joints_and_no_gripper():
    ep = _episode("xhand")
    ep.validate()
    assert lay.names(ep.end_effector.layout) == [f"hand_{i}" for i in range(12)]
    assert lay.gripper_dims(ep.state_layout) == () and lay.gripper_dims(ep.action_layout) == ()
    assert {d.unit for d in ep.end_effector.layout} == {"rad"} and ep.action_layout[0].mode == "absolute"


@pytest.mark.parametrize("name,binary,grippers,width", [("rt1", (), (6,), 7), ("xhand", (), (), 18)])
def test_ingest_stores_the_layouts_with_the_canonical_action_following_the_effector(name, binary, grippers, width):
    refs, _ = list_sources([str(SAMPLES / name)])
    row, _ = process_episode(refs[0], IngestConfig(), "test")
    action = lay.from_rows(row["action_layout"])
    assert len(action) == row["action_dim"] == width
    assert lay.names(action)[:6] == ["dx", "dy", "dz", "rx", "ry", "rz"]
    assert lay.binary_dims(action) == binary and lay.gripper_dims(lay.from_rows(row["state_layout"])) == grippers
    assert len(lay.from_rows(row["source_action_layout"])) == (7 if name == "rt1" else 19)


def test_a_continuous_gripper_is_normalised_like_an_arm_dim_and_a_binary_one_becomes_a_label():
    continuous = (lay.Dim("dx", "m", "delta"), lay.continuous_gripper(low=0.0, high=1.0))
    binary = (lay.Dim("dx", "m", "delta"), lay.binary_gripper(low=-1.0, high=1.0))
    x = np.array([[0.01, 0.0], [0.02, 0.3], [0.03, 0.92]])
    stats = {"mean": x.mean(0).tolist(), "std": x.std(0).tolist()}
    y = lay.to_model(x, stats, continuous)
    assert np.allclose(y[:, 1], (x[:, 1] - x[:, 1].mean()) / x[:, 1].std())  # 0.3 is not "closed"
    assert np.allclose(lay.from_model(y, stats, continuous), x)
    labels = lay.to_model(np.array([[0.0, -1.0], [0.0, 0.6]]), stats, binary)[:, 1]
    assert labels.tolist() == [-1.0, 1.0]
    assert lay.from_model(np.array([[0.0, 0.2], [0.0, -3.0]]), stats, binary)[:, 1].tolist() == [1.0, -1.0]


def test_a_binary_gripper_needs_its_two_values():
    with pytest.raises(lay.LayoutError, match="two values"):
        lay.Dim("gripper", gripper="binary")


def _fit(config: GR2Config, target: torch.Tensor, steps: int = 150) -> torch.Tensor:
    """Train a tiny model to output `target` (k, A) from one fixed observation; its select_action."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses to thread hand-offs (3 s against 40 s here)
    try:
        return _train(config, target, steps)
    finally:
        torch.set_num_threads(threads)


def _train(config: GR2Config, target: torch.Tensor, steps: int) -> torch.Tensor:
    model = GR2(config)
    obs = {"frames": torch.randint(0, config.codebook_size, (2, config.history, 1, config.tokens_per_view)),
           "state": torch.zeros(2, config.history, config.state_dim), "text_embedding": torch.zeros(2, config.text_dim)}
    batch = {**obs, "action": target.expand(2, config.history, *target.shape).clone()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().select_action(obs)[0]


TINY = dict(n_layer=1, n_head=2, n_embd=32, n_views=1, grid_h=2, grid_w=2, codebook_size=16, history=2, chunk=2,
            text_dim=8, latent_dim=4, vae_n_embd=32, vae_n_head=2, vae_n_layer=1, kl_weight=0.0, image_weight=0.0)


def test_the_model_regresses_a_continuous_gripper_instead_of_rounding_it_to_a_sign():
    target = torch.tensor([[0.5, 0.35], [0.5, 0.35]])  # arm 0.5, a gripper held a third open
    got = _fit(GR2Config(**TINY, state_dim=2, action_dim=2, action_binary=(), state_gripper=()), target)
    assert torch.allclose(got, target, atol=0.1), got
    # GR-1's default layout (binary gripper last) would answer with a sign: what the old code always did
    assumed = _fit(GR2Config(**TINY, state_dim=2, action_dim=2), target)
    assert set(assumed[:, 1].tolist()) <= {-1.0, 1.0}


def test_a_binary_gripper_anywhere_in_the_action_is_a_label_and_the_rest_regressed():
    target = torch.tensor([[-0.4, 1.0, 0.3], [-0.4, 1.0, 0.3]])
    got = _fit(GR2Config(**TINY, state_dim=3, action_dim=3, action_binary=(1,), state_gripper=(2,)), target)
    assert got[:, 1].tolist() == [1.0, 1.0]
    assert torch.allclose(got[:, [0, 2]], target[:, [0, 2]], atol=0.1), got


def test_a_config_naming_a_dim_outside_the_action_is_refused():
    with pytest.raises(ValueError, match="action_binary"):
        GR2Config(**TINY, action_dim=3, action_binary=(3,))


def _sample_lake(root: str, names: tuple[str, ...]):
    """The samples ingested episode by episode (no Ray) with a test tokenizer, as ingest writes them."""
    from test_training_lakes import save_tokenizer

    from gr2.lake.lake import Lake
    from gr2.video.tokenize import FrameTokenizer

    lake = Lake(root)
    models = Path(lake.root) / "models" / "tokenizers"
    tokenizer = str(next(models.iterdir())) if models.exists() else save_tokenizer(lake.root)[0]
    config = IngestConfig(frame_width=16, frame_height=16, tokenizer=tokenizer)
    for name in names:
        refs, _ = list_sources([str(SAMPLES / name)])
        row, steps = process_episode(refs[0], config, "test", FrameTokenizer(tokenizer))
        assert row["status"] == "accepted", row["reason"]
        lake.commit("steps", steps.to_pylist())
        lake.commit("episodes", [row])
    return lake


def test_training_follows_the_lakes_layouts_and_refuses_two_kinds_of_action(tmp_path):
    from gr2.training.data import DataConfig, TrainingDataError, iter_batches, plan_data
    from gr2.training.loop import TrainConfig, model_config_for

    lake = _sample_lake(str(tmp_path / "lake"), ("rt1", "bridge"))
    spec = plan_data(lake, "finetune", history=2, chunk=3, config=DataConfig(holdout=0.0))
    model = model_config_for(TrainConfig(size="tiny", stage="finetune"), spec)
    assert model.action_binary == () and model.state_gripper == (6,)  # both grippers continuous: regressed
    batch = next(iter_batches(spec, 16, epochs=1, shuffle=False))
    gripper = batch["action"][..., 6][~batch["action_is_pad"]]
    assert not set(gripper.unique().tolist()) <= {-1.0, 1.0}  # normalised openings, not signs

    _sample_lake(str(tmp_path / "lake"), ("xhand",))
    with pytest.raises(TrainingDataError, match="declare different action layouts"):
        plan_data(lake, "finetune", history=2, chunk=3, config=DataConfig(holdout=0.0))
    xhand = plan_data(lake, "finetune", history=2, chunk=3, config=DataConfig(holdout=0.0, episodes="dataset = 'xhand'"))
    assert lay.names(lay.from_rows(xhand.action_layout))[6:] == [f"hand_{i}" for i in range(12)]
