"""Evaluating a GR-2 checkpoint: held-out token accuracy and action error, a picture of predicted next
frames (decoded through the tokenizer) beside the truth, and closed-loop success in Meta-World.

The closed-loop policy (`MetaWorldPolicy`) sees what a robot would: rendered frames and the hand's
state. It turns them into exactly what training read from the lake: frames flipped as the recorder
flips them (Meta-World's cameras render upside down) and resized as ingest resizes them, VQ tokens
from the run's tokenizer, state normalised with the checkpoint's statistics; and it undoes the
action normalisation. Rollouts run in a process of their own (gr2.sim.env: torch beside osmesa).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from gr2.errors import Gr2Error
from gr2.lake.lake import Lake
from gr2.lake.query import sql_literal
from gr2.robot import layout as lay
from gr2.training import checkpoint as ckpt
from gr2.training.data import DataConfig, DataSpec, iter_batches, plan_data


@dataclass(frozen=True)
class EvalConfig:
    heldout_batches: int = 20  # at most this many held-out batches
    batch_size: int = 16
    frames_shown: int = 4  # held-out windows in the next-frame picture
    episodes: int = 20  # closed-loop Meta-World episodes (0: none)
    first_seed: int = 1000  # seeds first_seed.. : far from the recorder's demonstration seeds
    max_steps: int = 200
    videos: int = 2  # rollouts kept as mp4
    env_name: str | None = None  # None: from the episodes' instruction (gr2.sim.record.INSTRUCTIONS)
    render_size: int = 128  # what the recorder renders; frames are then resized as ingest resized them
    replan_every: int = 1  # env steps per predicted chunk used (1: re-plan every step, first action)


class EvaluationError(Gr2Error):
    """A checkpoint that cannot be evaluated as asked."""


def data_spec_for(lake: Lake, meta: dict) -> DataSpec:
    """The data the checkpoint trained on, re-planned on the lake: the same hash split, its own stats."""
    data, train_config = meta["data"], meta["train_config"]
    config = DataConfig(**{**train_config["data"], "cameras": tuple(data["cameras"]),
                           "state_dims": tuple(data["state_dims"]) if data["state_dims"] is not None else None,
                           "action_column": data["action_column"]})
    spec = plan_data(lake, meta["stage"], data["history"], data["chunk"], config, meta.get("tokenizer_path")
                     if meta.get("tokenizer_path") and os.path.exists(meta["tokenizer_path"]) else None)
    if spec.tokenizer_id != meta["tokenizer_id"]:
        raise EvaluationError(f"checkpoint {meta['checkpoint_id']} reads tokens of tokenizer {meta['tokenizer_id']}; "
                              f"the lake now holds tokenizer {spec.tokenizer_id}'s")
    try:
        ckpt.check_text_model(meta, spec.text, lake.root)
    except ckpt.CheckpointError as e:
        raise EvaluationError(str(e)) from None
    for key in ("state_layout", "action_layout"):
        mine = meta["data"].get(key)
        if spec.stage == "finetune" and mine is not None and not lay.same(lay.from_rows(mine), lay.from_rows(getattr(spec, key))):
            raise EvaluationError(f"checkpoint {meta['checkpoint_id']} was trained on a {key.replace('_', ' ')} of "
                                  f"{', '.join(lay.names(lay.from_rows(mine)))}; the lake's episodes declare "
                                  f"{', '.join(lay.names(lay.from_rows(getattr(spec, key))))}")
    return dataclasses.replace(spec, stats=meta["stats"])


@torch.no_grad()
def heldout_metrics(model, spec: DataSpec, config: EvalConfig = EvalConfig()) -> dict:
    """Token accuracy and next-frame loss; for fine-tuning also action error, normalised and in
    the action's own units (arm dims, first action of the chunk at each window's last step)."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i, batch in enumerate(iter_batches(spec, config.batch_size, split="heldout", epochs=1, shuffle=False)):
        if i >= config.heldout_batches:
            break
        b = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out = model(b)
        size = len(batch["id"])
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v) * size
        if spec.stage == "finetune":
            pred = model.select_action(b)[:, 0].numpy()
            true = b["action"][:, -1, 0].numpy()
            valid = ~b["action_is_pad"][:, -1, 0].numpy()
            layout = lay.from_rows(spec.action_layout)
            regressed = [i for i in range(len(layout)) if i not in lay.binary_dims(layout)]
            binary = list(lay.binary_dims(layout))
            arm = np.abs(lay.from_model(pred, spec.stats["action"], layout) - lay.from_model(true, spec.stats["action"], layout))
            sums["action_l1_units"] = sums.get("action_l1_units", 0.0) + float(arm[valid][:, regressed].mean(1).sum())
            if binary:
                sums["first_action_gripper_accuracy"] = sums.get("first_action_gripper_accuracy", 0.0) + float(
                    (np.sign(pred[valid][:, binary]) == np.sign(true[valid][:, binary])).mean(1).sum())
            sums["_valid"] = sums.get("_valid", 0.0) + float(valid.sum())
        n += size
    if n == 0:
        raise EvaluationError(f"no held-out samples in {spec.lake} (holdout {spec.config.holdout})")
    valid = sums.pop("_valid", 0.0)
    out = {k: v / (max(valid, 1) if k in ("action_l1_units", "first_action_gripper_accuracy") else n)
           for k, v in sums.items()}
    out["heldout_samples"] = n
    return out


def load_tokenizer(meta: dict, lake_root: str):
    from gr2.tokenizers import load_checkpoint

    path = meta.get("tokenizer_path")
    if not path or not os.path.exists(os.path.join(path, "config.json")):
        path = Lake(lake_root).find_checkpoint("tokenizer", meta["tokenizer_id"])
    if path is None:
        raise EvaluationError(f"tokenizer {meta['tokenizer_id']} of checkpoint {meta['checkpoint_id']} is not under "
                              f"{lake_root}/models")
    return load_checkpoint(path).tokenizer, path


@torch.no_grad()
def next_frame_picture(model, tokenizer, spec: DataSpec, path: str, count: int = 4) -> str:
    """A PNG: per held-out window and view, the last context frame, the predicted next frame and the
    true next frame, all decoded through the tokenizer (so the truth is what the tokens can show)."""
    from PIL import Image

    model.eval()
    batch = next(iter_batches(spec, count, split="heldout", epochs=1, shuffle=False))
    b = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    frames = b["frames"]
    B, T, V, _ = frames.shape
    h, w = spec.grid
    predicted = model.frame_logits(b)[:, T - 2].argmax(-1)  # step T-2's outputs predict frame T-1
    grids = torch.stack([frames[:, T - 2], predicted, frames[:, T - 1]], dim=2)  # (B, V, 3, N)
    images = tokenizer.decode(grids.reshape(-1, h, w))  # (B*V*3, 3, H, W) in [0, 1]
    H, W = images.shape[-2:]
    tiles = (images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8).reshape(B * V, 3, H, W, 3)
    sheet = np.concatenate([np.concatenate(list(row), axis=1) for row in tiles], axis=0)
    scale = max(1, 256 // W)
    Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST).save(path)
    return path


def instruction_embedding(meta: dict, instruction: str, lake_root: str | None = None) -> np.ndarray:
    """The embedding the checkpoint's policy sees for `instruction`: the lake's stored one when its
    episodes hold that instruction embedded by the checkpoint's text model, else the recorded text
    model built here (a random-init tower is seeded, so it makes the same vectors); zeros for none."""
    text = meta.get("text") or {}
    dim = meta["model"]["text_dim"]
    if not instruction.strip():
        return np.zeros(dim, np.float32)
    if not text.get("model"):
        raise EvaluationError(f"checkpoint {meta['checkpoint_id']} was trained without text embeddings: "
                              f"it cannot follow the instruction {instruction!r}")
    lake = Lake(lake_root) if lake_root else None
    if lake is not None and lake.exists("episodes") and "instruction_embedding" in lake.dataset("episodes").schema.names:
        rows = lake.read("episodes", columns=["instruction_embedding", "text_model", "text_pretrained"],
                         filter=f"instruction = {sql_literal(instruction)} AND instruction_embedding IS NOT NULL")
        for r in rows.to_pylist():
            if (r["text_model"], r["text_pretrained"]) == (text["model"], text["pretrained"]):
                return np.asarray(r["instruction_embedding"], np.float32)
    from gr2.video.embed import TextEmbedder

    return TextEmbedder(text["model"], text["pretrained"])([instruction])[0].astype(np.float32)


# -- closed loop in Meta-World ------------------------------------------------------------------


class MetaWorldPolicy:
    """A GR-2 checkpoint acting in Meta-World: observation dict -> 4-d action (gr2.sim.env.Policy),
    or many episodes' observations -> their actions in one forward pass (`act`, a BatchPolicy).

    The state layout is the recorder's (gr2.sim.record.STATE_NAMES); Meta-World's observation
    gives the hand position and gripper opening, and the hand's orientation, which Meta-World
    holds fixed, is taken at its training mean. Actions come back in Meta-World's units: the
    recorded command (source_action) as is, or an ee_delta position change scaled by the
    environment's action_scale (1/100 m per unit)."""

    ACTION_SCALE = 1 / 100  # metaworld SawyerXYZEnv.action_scale

    def __init__(self, checkpoint: str, tokenizer: str, instruction: str = "", replan_every: int = 1, threads: int = 1,
                 lake: str | None = None):
        """lake: where to look up the instruction's stored embedding (default: the lake the checkpoint trained on)."""
        from gr2.sim.record import STATE_NAMES
        from gr2.tokenizers import load_checkpoint as load_tokenizer_checkpoint

        torch.set_num_threads(threads)
        loaded = ckpt.load_checkpoint(checkpoint)
        self.model, meta = loaded.model.eval(), loaded.meta
        self.tokenizer = load_tokenizer_checkpoint(tokenizer).tokenizer.eval()
        data = meta["data"]
        self.cameras, self.history, self.stats = data["cameras"], data["history"], meta["stats"]
        self.stride = data.get("frame_stride", 1)  # steps between history frames, as in training
        self.action_column = data["action_column"]
        self.action_layout = lay.from_rows(data["action_layout"])
        h, w = data["grid"]
        f = self.tokenizer.config.downsample
        self.size = (w * f, h * f)
        dims = data["state_dims"] if data["state_dims"] is not None else list(range(len(STATE_NAMES)))
        self.state_names = [STATE_NAMES[d] for d in dims]
        self.state_layout = lay.from_rows(data["state_layout"])
        mean = np.asarray(self.stats["state"]["mean"])
        self.state_fill = {n: mean[i] for i, n in enumerate(self.state_names)}
        self.text = torch.as_tensor(instruction_embedding(meta, instruction, lake or meta.get("lake")))[None]
        self.replan_every = replan_every
        self.reset()

    def reset(self, episodes: int = 1) -> None:
        """Start `episodes` episodes (gr2.sim.env.BatchPolicy); calling the policy plays episode 0."""
        span = (self.history - 1) * self.stride + 1  # the steps one window reaches back over
        self.episodes = [_Episode(deque(maxlen=span), deque(maxlen=span)) for _ in range(episodes)]

    def _tokens(self, observations: list[dict]) -> torch.Tensor:
        """(episodes, views, tokens): each observation's frames flipped and resized as the lake holds
        them, encoded in one batch."""
        from PIL import Image

        images = []
        for observation in observations:
            for camera in self.cameras:
                image = observation[f"observation.images.{camera}"][::-1]  # as the recorder stores it
                if image.shape[1::-1] != self.size:
                    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(self.size, Image.BILINEAR))
                images.append(image)
        grids = self.tokenizer.encode(np.stack(images).transpose(0, 3, 1, 2))  # (episodes * V, h, w)
        return grids.flatten(1).reshape(len(observations), len(self.cameras), -1)

    def _state(self, observation: dict) -> np.ndarray:
        x, y, z, gripper = observation["observation.state"]
        seen = {"x": x, "y": y, "z": z, "gripper": gripper}
        raw = np.array([seen.get(n, self.state_fill[n]) for n in self.state_names])
        return lay.to_model(raw, self.stats["state"], self.state_layout).astype(np.float32)

    def __call__(self, observation: dict) -> np.ndarray:
        return self.act({0: observation})[0]

    @torch.no_grad()
    def act(self, observations: dict[int, dict]) -> dict[int, np.ndarray]:
        """Actions for the given episodes' observations; the model runs once for all that re-plan."""
        tokens = self._tokens(list(observations.values()))
        for k, (i, observation) in enumerate(observations.items()):
            episode = self.episodes[i]
            episode.frames.append(tokens[k])
            episode.states.append(self._state(observation))
            episode.t += 1
        out = {i: self.episodes[i].plan.pop(0) for i in observations
               if self.episodes[i].plan and (self.episodes[i].t - 1) % self.replan_every}
        planning = [i for i in observations if i not in out]
        if not planning:
            return out
        # history step j sits (h-1-j)*stride steps back; before the episode reaches that far it repeats
        # the first step, marked as padding (as gr2.robot.actions.window_indices clamps in training)
        back = [(self.history - 1 - j) * self.stride for j in range(self.history)]
        frames, states, pads = [], [], []
        for i in planning:
            episode = self.episodes[i]
            have = len(episode.frames)
            index = [max(have - 1 - b, 0) for b in back]
            frames.append(torch.stack([episode.frames[j] for j in index]))
            states.append(np.stack([episode.states[j] for j in index]))
            pads.append([have - 1 - b < 0 for b in back])
        obs = {"frames": torch.stack(frames), "state": torch.as_tensor(np.stack(states)),
               "step_is_pad": torch.tensor(pads), "text_embedding": self.text.expand(len(planning), -1)}
        chunks = self.model.select_action(obs).numpy().astype(np.float64)
        for i, chunk in zip(planning, chunks):
            chunk = lay.from_model(chunk, self.stats["action"], self.action_layout)
            if self.action_column != "source_action":  # ee_delta: metres -> Meta-World's command units
                chunk = np.concatenate([chunk[:, :3] / self.ACTION_SCALE, chunk[:, -1:]], axis=1)
            actions = [np.clip(a, -1.0, 1.0).astype(np.float32) for a in chunk]
            self.episodes[i].plan = actions[1:self.replan_every]
            out[i] = actions[0]
        return out


@dataclass
class _Episode:
    """What MetaWorldPolicy remembers of one running episode: its last steps' tokens and states."""

    frames: deque
    states: deque
    plan: list = dataclasses.field(default_factory=list)
    t: int = 0


def env_name_for(spec: DataSpec, config: EvalConfig) -> str:
    if config.env_name:
        return config.env_name
    from gr2.sim.record import INSTRUCTIONS

    tasks = {t for t, text in INSTRUCTIONS.items() if text in set(spec.instructions.values())}
    if len(tasks) != 1:
        raise EvaluationError("cannot tell the Meta-World task from the episodes' instructions "
                              f"{sorted(set(spec.instructions.values()))}: set env_name")
    return tasks.pop()


def closed_loop(checkpoint: str, tokenizer: str, spec: DataSpec, config: EvalConfig, out_dir: str) -> dict:
    """Success rate over `config.episodes` seeded Meta-World episodes; mp4s of the first `videos`."""
    from gr2.sim.env import RolloutConfig, run_rollouts_in_subprocess
    from gr2.sim.record import INSTRUCTIONS, write_mp4

    rollout = RolloutConfig(env_name=env_name_for(spec, config), cameras=tuple(spec.cameras),
                            seeds=tuple(range(config.first_seed, config.first_seed + config.episodes)),
                            image_size=config.render_size, max_steps=config.max_steps, record_episodes=config.videos)
    factory = functools.partial(MetaWorldPolicy, checkpoint, tokenizer, INSTRUCTIONS.get(rollout.env_name, ""),
                                config.replan_every)
    result = run_rollouts_in_subprocess(factory, rollout)
    videos = []
    for episode in result.episodes:
        if episode.frames:
            # cameras side by side, the right way up, at half real time (control runs at 80 Hz)
            frames = np.concatenate([episode.frames[c][:, ::-1] for c in rollout.cameras], axis=2)
            path = os.path.join(out_dir, f"rollout-seed{episode.seed}-{'success' if episode.success else 'failure'}.mp4")
            write_mp4(path, list(frames), fps=40)
            videos.append(path)
    return {"env_name": rollout.env_name, "success_rate": result.success_rate, "episodes": len(result.episodes),
            "successes": sum(e.success for e in result.episodes), "seeds": list(rollout.seeds),
            "steps": [e.steps for e in result.episodes], "videos": videos}


def evaluate(lake_root: str, checkpoint: str | None = None, config: EvalConfig = EvalConfig(),
             out_dir: str | None = None) -> dict:
    """Everything above for `checkpoint` (id or directory; default: the lake's latest)."""
    lake = Lake(lake_root)
    directory = ckpt.resolve_checkpoint(lake.root, checkpoint)
    loaded = ckpt.load_checkpoint(directory)
    meta = loaded.meta
    spec = data_spec_for(lake, meta)
    out_dir = out_dir or os.path.join(directory.rsplit("/", 1)[0], "eval", meta["checkpoint_id"])
    os.makedirs(out_dir, exist_ok=True)
    tokenizer, tokenizer_path = load_tokenizer(meta, lake.root)
    result = {"checkpoint_id": meta["checkpoint_id"], "checkpoint": directory, "stage": meta["stage"],
              "step": meta["step"], "heldout": heldout_metrics(loaded.model, spec, config),
              "unigram_entropy_nats": meta.get("unigram_entropy_nats")}
    result["next_frames_png"] = next_frame_picture(loaded.model, tokenizer, spec, os.path.join(out_dir, "next_frames.png"),
                                                   config.frames_shown)
    if meta["stage"] == "finetune" and config.episodes > 0:
        result["closed_loop"] = closed_loop(directory, tokenizer_path, spec, config, out_dir)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    result["out_dir"] = out_dir
    return result
