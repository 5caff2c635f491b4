"""Tiny lakes for the training tests, as the tokenizer and the robot ingest leave them.

Tokens are built so their values can be checked (and learned): a robot step's grid holds its
step index and view, a clip's frame t+1 is frame t shifted by one code. The tokenizer checkpoint
they claim to come from is a real (random-init) gr2.tokenizers checkpoint under <lake>/models.
"""

from __future__ import annotations

import functools

import lance
import numpy as np
import pyarrow as pa

from gr2.lake import schema
from gr2.lake.lake import Lake

CODES = 64  # the test tokenizer's codebook
GRID = (2, 2)  # 16x16 frames at f=8
INSTRUCTION = "open the drawer"
TEXT_MODEL = ("ViT-B-32", "none")  # what ingest and the build embed texts with by default


def _embed(texts: tuple[str, ...]):
    from gr2.video.embed import TextEmbedder

    return TextEmbedder(*TEXT_MODEL)(list(texts))


@functools.lru_cache(maxsize=1)
def text_embedder():
    """texts -> their embeddings by the default text model, built in a process of its own: open_clip
    imports torch._dynamo, which segfaults in a test process that has rendered Meta-World (DESIGN.md)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    cache: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        new = tuple(t for t in dict.fromkeys(texts) if t not in cache)
        if new:
            cache.update(zip(new, pool.submit(_embed, new).result()))
        return np.stack([cache[t] for t in texts])

    return embed


def text_columns(text: str | None, column: str) -> dict:
    """The stored embedding of `text` in `column` with its text model, as ingest and the build store them."""
    if not text:
        return {column: None, "text_model": None, "text_pretrained": None}
    return {column: text_embedder()([text])[0].tolist(), "text_model": TEXT_MODEL[0], "text_pretrained": TEXT_MODEL[1]}


def save_tokenizer(lake_root: str, codebook: int = CODES, seed: int = 0) -> tuple[str, str]:
    """A random-init tokenizer (16x16 frames -> 2x2 grids) under <lake>/models/tokenizers/; (dir, id)."""
    import torch

    from gr2.tokenizers import Tokenizer, TokenizerConfig, save_checkpoint

    torch.manual_seed(seed)
    tok = Tokenizer(TokenizerConfig(resolution=16, downsample=8, channels=8, z_channels=16,
                                    codebook_size=codebook, code_dim=8))
    tmp = f"{lake_root}/models/tokenizers/tmp-{seed}-{codebook}"
    cid = save_checkpoint(tok, tmp, info={"note": "random init, for tests"})
    final = f"{lake_root}/models/tokenizers/{cid}"
    import os

    os.rename(tmp, final)
    return final, cid


def step_tokens(episode: int, step: int, view: int) -> list[int]:
    """The grid a step's view carries: readable back as (step, view)."""
    base = (step * 2 + view) % CODES
    return [base, (base + 1) % CODES, episode % CODES, view]


def _metaworld_layouts() -> dict:
    """The layouts ingest stores for a Meta-World recording (gr2.sim.record declares them)."""
    from gr2.robot import layout as lay
    from gr2.sim.record import ACTION_LAYOUT, STATE_LAYOUT

    return {"state_layout": lay.to_rows(STATE_LAYOUT), "action_layout": lay.to_rows(lay.ee_delta(ACTION_LAYOUT[-1:])),
            "source_action_layout": lay.to_rows(ACTION_LAYOUT)}


METAWORLD_LAYOUTS = _metaworld_layouts()


def robot_lake(root: str, episodes: int = 4, length: int = 12, cameras=("corner", "gripperPOV"),
               tokenizer_id: str | None = "", flagged: dict | None = None, seed: int = 0, tokenizer_seed: int = 0,
               instruction: str = INSTRUCTION) -> Lake:
    """Accepted episodes of `length` steps: state [x, y, z, qx, qy, qz, qw, gripper], source actions
    [dx, dy, dz, gripper] and ee_delta actions; tokens per view unless tokenizer_id is None.

    tokenizer_id "": save a test tokenizer and use its id. flagged: {(episode, step): camera} views
    left without a frame, as alignment leaves a dropped one."""
    lake = Lake(root)
    if tokenizer_id == "":
        _, tokenizer_id = save_tokenizer(lake.root, seed=tokenizer_seed)
    rng = np.random.default_rng(seed)
    flagged = flagged or {}
    episode_rows, step_rows = [], []
    for e in range(episodes):
        eid = f"ep{e:03d}"
        pos = np.cumsum(rng.normal(0, 0.01, (length, 3)), 0) + [0, 0.6, 0.2]
        for t in range(length):
            views = []
            for v, camera in enumerate(cameras):
                ok = flagged.get((e, t)) != camera
                views.append({"camera": camera, "ok": ok, "jpeg": b"\xff\xd8" if ok else None, "frame_index": t,
                              "timestamp_s": t * 0.05, "skew_s": 0.0,
                              "tokens": step_tokens(e, t, v) if ok and tokenizer_id else None,
                              "token_shape": list(GRID) if ok and tokenizer_id else None})
            gripper = 1.0 if t < length // 2 else -1.0
            step_rows.append({
                "step_id": f"{eid}:{t:06d}", "episode_id": eid, "dataset": "test", "step": t, "timestamp_s": t * 0.05,
                "state": [*pos[t], 0.0, 0.0, 0.0, 1.0, 1.0],
                "action": None if t == length - 1 else [*(pos[t + 1] - pos[t]), 0.0, 0.0, 0.0, gripper],
                "source_action": [*((pos[min(t + 1, length - 1)] - pos[t]) * 100), gripper],
                "views": views, "flags": [f"view:{c}" for (ee, tt), c in flagged.items() if (ee, tt) == (e, t)],
                "build_id": "test",
            })
        episode_rows.append({"episode_id": eid, "source": "test", "episode_key": str(e), "format": "lerobot",
                             "dataset": "test", "instruction": instruction, **text_columns(instruction, "instruction_embedding"),
                             "status": "accepted", "length": length,
                             "state_dim": 8, "action_dim": 7, "action_space": "ee_delta", **METAWORLD_LAYOUTS,
                             "cameras": list(cameras),
                             "frame_width": 16, "frame_height": 16, "tokenizer_id": tokenizer_id or None,
                             "build_id": "test"})
    lake.commit("steps", step_rows)
    lake.commit("episodes", episode_rows)
    return lake


def clip_tokens(clip: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """[T, h, w]: a random first frame, then each frame its predecessor shifted by one code."""
    first = rng.integers(0, CODES, GRID)
    return np.stack([(first + t) % CODES for t in range(frames)]).astype(np.uint16)


def clips_lake(root: str, clips: int = 12, frames: int = 6, tokens: bool = True, seed: int = 0,
               tokenizer_id: str | None = None) -> Lake:
    """Accepted clips with [T, h, w] token grids (or none), plus a rejected one without."""
    lake = Lake(root)
    if tokens and tokenizer_id is None:
        _, tokenizer_id = save_tokenizer(lake.root)
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(clips):
        grid = clip_tokens(c, frames, rng)
        rows.append({"clip_id": f"clip{c:03d}", "video_id": "v", "status": "accepted", "caption": f"clip {c % 3}",
                     **text_columns(f"clip {c % 3}", "caption_embedding"),
                     "build_id": "test", "tokens": grid.reshape(-1).tolist() if tokens else None,
                     "token_shape": list(grid.shape) if tokens else None, "tokenizer_id": tokenizer_id if tokens else None})
    rows.append({"clip_id": "rejected", "video_id": "v", "status": "rejected", "reason": "black:3.0", "build_id": "test",
                 "tokens": None, "token_shape": None, "tokenizer_id": None})
    commit_clips(lake, rows)
    return lake


def commit_clips(lake: Lake, rows: list[dict]) -> None:
    """Through Lake.commit once the clips schema has the token columns; until then, the same table
    written directly with those columns added as the tokenize stage will add them."""
    if "tokens" in schema.CLIPS.names:
        lake.commit("clips", rows)
        return
    extra = [pa.field("tokens", pa.list_(pa.uint16())), pa.field("token_shape", pa.list_(pa.int32())),
             pa.field("tokenizer_id", pa.string())]
    full = pa.schema(list(schema.CLIPS) + extra)
    lance.write_dataset(pa.Table.from_pylist(rows, schema=full), lake.uri("clips"), mode="overwrite")


def test_the_tiny_robot_lake_holds_what_ingest_writes(tmp_path):
    lake = robot_lake(str(tmp_path / "lake"), episodes=2, length=5)
    steps = lake.read("steps")
    assert len(steps) == 10 and steps.schema.equals(schema.STEPS)
    views = steps.column("views")[3].as_py()
    assert [v["tokens"] for v in views] == [step_tokens(0, 3, 0), step_tokens(0, 3, 1)]


def test_the_tiny_clips_lake_has_shifted_frames(tmp_path):
    lake = clips_lake(str(tmp_path / "lake"), clips=2, frames=3)
    row = lake.dataset("clips").to_table(filter="clip_id = 'clip000'").to_pylist()[0]
    grid = np.asarray(row["tokens"]).reshape(row["token_shape"])
    assert np.array_equal(grid[1], (grid[0] + 1) % CODES)
