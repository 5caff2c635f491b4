"""The GR-2 style GPT: shapes, block-causal attention, losses, acting, sizes."""

from dataclasses import replace

import pytest
import torch

from gr2.training.model import GR2, SIZES, GR2Config, block_causal_mask
from gr2.training.text import TextEncoder
from gr2.video.embed import ModelWeightsError

B, T, V = 3, 3, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture
def config():
    return GR2Config.named("tiny", n_layer=2, n_head=2, n_embd=64, grid_h=4, grid_w=4,
                           codebook_size=64, history=T, chunk=3, text_dim=32,
                           vae_n_embd=32, vae_n_head=2, vae_n_layer=1)


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return GR2(config)


@pytest.fixture
def batch(config):
    g = torch.Generator().manual_seed(1)
    c = config
    action = torch.rand(B, T, c.chunk, c.action_dim, generator=g) * 2 - 1
    action[..., -1] = torch.where(action[..., -1] > 0, 1.0, -1.0)
    return dict(
        frames=torch.randint(0, c.codebook_size, (B, T, V, c.grid_h, c.grid_w), generator=g),
        text_embedding=torch.randn(B, c.text_dim, generator=g),
        state=torch.randn(B, T, c.state_dim, generator=g),
        action=action,
    )


def video_only(batch):
    return {k: batch[k] for k in ("frames", "text_embedding")}


def test_fine_tuning_batch_gives_every_loss_part_and_metric(model, batch):
    out = model(batch)
    assert set(out) == {"loss", "loss_image", "token_accuracy", "loss_arm", "loss_gripper",
                        "loss_kl", "action_l1", "gripper_accuracy"}
    assert all(v.shape == () and torch.isfinite(v) for v in out.values())
    c = model.config
    expected = (c.arm_weight * out["loss_arm"] + c.gripper_weight * out["loss_gripper"]
                + c.kl_weight * out["loss_kl"] + c.image_weight * out["loss_image"])
    torch.testing.assert_close(out["loss"], expected)
    # an untrained model is near chance on next-frame tokens
    assert abs(out["loss_image"].item() - torch.log(torch.tensor(64.0)).item()) < 0.5


def test_frame_logits_and_action_chunk_have_the_documented_shapes(model, batch, config):
    logits = model.frame_logits(batch)
    assert logits.shape == (B, T, V, config.tokens_per_view, config.codebook_size)
    model.eval()
    chunk = model.select_action(batch)
    assert chunk.shape == (B, config.chunk, config.action_dim)


def test_block_causal_mask_lets_a_step_see_only_text_and_steps_up_to_itself():
    mask = block_causal_mask(n_steps=2, per_step=2)
    assert mask.tolist() == [
        [True, False, False, False, False],  # text
        [True, True, True, False, False],  # step 0
        [True, True, True, False, False],
        [True, True, True, True, True],  # step 1
        [True, True, True, True, True],
    ]


def test_future_steps_do_not_leak_into_earlier_outputs(model, batch, config):
    model.eval()
    logits = model.frame_logits(batch)
    hidden = model._trunk(batch)
    future = dict(batch)
    future["frames"] = batch["frames"].clone()
    future["frames"][:, 2] = (future["frames"][:, 2] + 1) % config.codebook_size
    future["state"] = batch["state"].clone()
    future["state"][:, 2] += 1.0
    logits_f, hidden_f = model.frame_logits(future), model._trunk(future)
    torch.testing.assert_close(logits_f[:, :2], logits[:, :2])  # steps 0 and 1 unchanged
    torch.testing.assert_close(hidden_f[:, :2], hidden[:, :2])  # state and action query too
    assert not torch.allclose(logits_f[:, 2], logits[:, 2])  # step 2 does see its own frame


def test_a_step_sees_earlier_frames(model, batch, config):
    model.eval()
    past = dict(batch)
    past["frames"] = batch["frames"].clone()
    past["frames"][:, 0] = (past["frames"][:, 0] + 1) % config.codebook_size
    assert not torch.allclose(model.frame_logits(past)[:, 2], model.frame_logits(batch)[:, 2])


def test_loss_falls_when_overfitting_a_tiny_batch(model, batch):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch)
    for _ in range(200):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    model.eval()
    last = model(batch)
    assert last["loss"] < 0.5 * first["loss"]
    assert last["loss_image"] < 0.5 * first["loss_image"]
    assert last["token_accuracy"] > 0.5
    assert last["action_l1"] < 0.6 * first["action_l1"]


def test_select_action_decodes_the_zero_latent_deterministically(model, batch):
    model.eval()
    a, b = model.select_action(batch), model.select_action(batch)
    torch.testing.assert_close(a, b)
    context = model._trunk(batch)[:, -1, -1]
    arm, _ = model.action_head.decode(context, torch.zeros(B, model.config.latent_dim))
    torch.testing.assert_close(a[..., :-1], arm)
    assert set(a[..., -1].unique().tolist()) <= {-1.0, 1.0}


def test_select_action_without_state_is_refused(model, batch):
    with pytest.raises(ValueError, match="state"):
        model.select_action(video_only(batch))


def test_pretraining_on_video_alone_trains_the_frame_predictor_only(model, batch):
    out = model(video_only(batch))
    assert set(out) == {"loss", "loss_image", "token_accuracy"}
    assert out["loss"] == out["loss_image"]
    out["loss"].backward()
    assert model.tok_emb.weight.grad is not None
    assert all(p.grad is None for p in model.action_head.parameters())
    assert model.state_arm.weight.grad is None


def test_pretraining_takes_one_view_of_a_two_view_model(model, batch):
    one_view = video_only(batch)
    one_view["frames"] = batch["frames"][:, :, :1]
    assert model.frame_logits(one_view).shape[2] == 1
    assert torch.isfinite(model(one_view)["loss"])


def test_padded_actions_and_steps_do_not_count(model, batch):
    model.eval()
    padded = dict(batch)
    padded["action_is_pad"] = torch.zeros(B, T, model.config.chunk, dtype=torch.bool)
    padded["action_is_pad"][:, :, -1] = True
    padded["step_is_pad"] = torch.tensor([[True, False, False]] * B)
    out = model(padded)
    changed = dict(padded)
    changed["action"] = batch["action"].clone()
    changed["action"][:, :, -1] += 5.0  # past the episode's end
    changed["action"][:, 0] += 5.0  # a step before the episode's start
    torch.testing.assert_close(model(changed)["loss"], out["loss"])


def test_frames_that_do_not_fit_the_model_are_refused(model, batch):
    bad = dict(batch)
    bad["frames"] = torch.zeros(B, T, V, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="do not fit"):
        model(bad)


def test_text_goes_through_a_frozen_random_init_open_clip_tower(config, batch):
    encoder = TextEncoder("ViT-S-32-alt", pretrained=None)
    model = GR2(replace(config, text_dim=encoder.embed_dim), text_encoder=encoder)
    with_text = {k: v for k, v in batch.items() if k != "text_embedding"}
    with_text["text"] = ["open the drawer", "close the drawer", "push the button"]
    model.train()
    out = model(with_text)
    out["loss"].backward()
    assert not encoder.training
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    assert model.num_params() < model.num_params(trainable_only=False) - 10_000_000
    # the caption matters: a different one changes what the model predicts
    model.eval()
    other = dict(with_text, text=["x", "y", "z"])
    assert not torch.allclose(model.frame_logits(with_text), model.frame_logits(other))


def test_missing_clip_weights_fail_naming_the_tag_or_file(tmp_path):
    with pytest.raises(ModelWeightsError, match="openai"):
        TextEncoder("ViT-B-32", pretrained="openai")  # a real tag, not in this machine's cache
    missing = str(tmp_path / "clip.safetensors")
    with pytest.raises(ModelWeightsError, match="clip.safetensors"):
        TextEncoder("ViT-B-32", pretrained=missing)


def test_named_sizes_match_the_papers_trainable_parameter_counts():
    counts = {}
    for size in SIZES:
        with torch.device("meta"):  # counts without allocating B's weights
            counts[size] = GR2(GR2Config.named(size)).num_params()
    assert counts["tiny"] < 3e6
    assert 29e6 < counts["S"] < 31e6
    assert 93e6 < counts["B"] < 97e6


def test_unknown_size_is_refused():
    with pytest.raises(ValueError, match="tiny"):
        GR2Config.named("XL")
