"""Token grids for robot steps after ingest, so `gr2 tokenize` covers every table that holds frames.

A lake ingested before its tokenizer was trained (the README's order: ingest, train-tokenizer,
tokenize) would otherwise never fine-tune: ingest skips accepted episodes on a re-run. Each accepted
episode whose views carry another tokenizer's tokens (or none) is re-tokenized from its stored JPEGs,
what training decodes too; each distinct frame of a camera is encoded once. The episode row then
says which tokenizer its steps carry, so clips and steps end on one tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gr2.lake.lake import Lake, actor_args
from gr2.progress import progress
from gr2.robot.episode import EpisodeError
from gr2.robot.ingest import _from_ipc, _ipc, _tokens_u16
from gr2.video.tokenize import FrameTokenizer


@dataclass
class StepTokens:
    tokenizer_id: str
    episodes: int = 0  # accepted episodes in the lake
    tokenized: int = 0
    already: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)


class EpisodeTokens:
    """Ray Data stage: episode ids -> their steps' (step_id, views) with token grids, as Arrow IPC."""

    def __init__(self, lake_root: str, checkpoint_dir: str):
        self.lake, self.encoder = Lake(lake_root), FrameTokenizer(checkpoint_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, errors = [], []
        for eid in batch["episode_id"]:
            try:
                out.append(_ipc(self.episode(str(eid))))
                errors.append("")
            except (EpisodeError, OSError, ValueError) as e:  # one bad episode never stops the rest
                out.append(b"")
                errors.append(f"{eid}: {e}")
        return {"episode_id": batch["episode_id"], "ipc": np.array(out, dtype=object),
                "error": np.array(errors, dtype=object)}

    def episode(self, episode_id: str) -> pa.Table:
        import io

        from PIL import Image

        steps = self.lake.read("steps", columns=["step_id", "views"], filter=pc.field("episode_id") == episode_id)
        views = steps.column("views").to_pylist()
        for camera in range(max((len(v) for v in views if v), default=0)):
            frames = {}  # frame index -> its JPEG, once per distinct frame
            for step in views:
                entry = step[camera]
                if entry["ok"] and entry["jpeg"] is not None:
                    frames.setdefault(entry["frame_index"], entry["jpeg"])
            if not frames:
                continue
            order = sorted(frames)
            pixels = np.stack([np.asarray(Image.open(io.BytesIO(frames[i])).convert("RGB")) for i in order])
            grids = dict(zip(order, _tokens_u16(np.asarray(self.encoder(pixels)), episode_id)))
            for step in views:
                entry = step[camera]
                grid = grids.get(entry["frame_index"]) if entry["ok"] else None
                entry["tokens"] = grid.reshape(-1).tolist() if grid is not None else None
                entry["token_shape"] = list(grid.shape) if grid is not None else None
        return pa.table({"step_id": steps.column("step_id"), "views": views})


def tokenize_steps(lake: Lake, checkpoint_dir: str, only_missing: bool = True, actors: int = 1,
                   log=print) -> StepTokens:
    """Give every accepted episode's steps tokens of `checkpoint_dir`'s tokenizer, through `Lake.update`."""
    import ray

    from gr2.tokenizers import read_config

    _, tid, _ = read_config(checkpoint_dir)
    result = StepTokens(tid)
    if not lake.exists("episodes") or not lake.exists("steps"):
        return result
    episodes = lake.read("episodes", columns=["episode_id", "tokenizer_id"], filter="status = 'accepted'").to_pylist()
    result.episodes = len(episodes)
    todo = [e["episode_id"] for e in episodes if not only_missing or e["tokenizer_id"] != tid]
    result.already = result.episodes - len(todo)
    log(f"tokenizer {tid}: {len(todo)} of {result.episodes} accepted episodes' steps to tokenize")
    if not todo:
        return result
    ds = ray.data.from_items([{"episode_id": e} for e in todo]).map_batches(
        EpisodeTokens, fn_constructor_args=(lake.root, checkpoint_dir), batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), **actor_args())
    with progress(len(todo), "tokenize: episodes", "episode") as bar:
        for row in ds.iter_rows():
            bar.update()
            if row["error"]:
                result.failed += 1
                result.failures.append(row["error"])
                continue
            # steps first, then the episode's tokenizer_id: an interrupted run redoes this episode
            lake.update("steps", _from_ipc(row["ipc"]))
            lake.update("episodes", pa.table({"episode_id": [row["episode_id"]], "tokenizer_id": [tid]}))
            result.tokenized += 1
    log(f"tokenizer {tid}: {result.tokenized} episodes tokenized, {result.failed} failed")
    return result
