"""Training data read straight from the lake's Lance tables, sharded per rank, through a shuffle buffer.

Pre-training: accepted clips.lance rows that carry VQ tokens -> every window of `history`
consecutive frames of a clip, with its caption's stored embedding. Fine-tuning: steps.lance -> for each step t of an
episode, the history steps t-(h-1)s..t, s steps apart (`frame_stride`, default 1; token grids of
every chosen view, state) and for each of them
the chunk of k actions that follows (gr2.robot.actions.windows: early history repeats the first
step and is marked `step_is_pad`, chunk entries past the end `action_is_pad`).

Nothing is copied out of the lake. `plan_data` runs once on the driver: it checks the lake can
train at all (tokens present, one tokenizer, a known codebook, views and shapes consistent),
pins the table versions so every rank reads the same snapshot, splits off held-out items and
computes normalisation statistics. Each rank then opens the Lance datasets itself and reads only
its share: every world-th clip of a filtered scan, or whole episodes (a window needs its
neighbours) by a per-epoch permutation of episode ids. A local lake and one on object storage
read the same way.

Language is the lake's stored text embedding of the caption or instruction (`text_embedding`, zeros
where there is no text), never the string: training, evaluation and the policy see the same vectors.
A lake whose texts were embedded by two text models is refused: their vectors are not comparable.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from gr2.errors import Gr2Error
from gr2.lake.lake import Lake
from gr2.lake.query import sql_literal
from gr2.robot import actions as act
from gr2.robot import layout as lay

STAGES = ("pretrain", "finetune")
NO_TEXT = {"model": None, "pretrained": None, "dim": 512}  # a lake without text: zeros, GR2Config's text_dim
ENTROPY_SAMPLE = 20_000  # clips whose tokens the unigram entropy is counted over


class TrainingDataError(Gr2Error):
    """A lake (or a request of it) that training cannot start from; the message says what to do."""


class DataConfig(BaseModel):
    """What to read from the lake, and how; history and chunk come from the model config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cameras: tuple[str, ...] = ()  # fine-tuning views, in model view order; empty: every camera of the episodes
    state_dims: tuple[int, ...] | None = None  # columns of `state` the model sees; None: all
    action_column: str = "action"  # steps column: "action" (ee_delta) or "source_action" (as recorded)
    # fine-tuning: steps between a window's history frames. 1: consecutive steps, whose frames a
    # camera slower than the control rate mostly repeats (Meta-World: 80 Hz steps, 20 fps cameras),
    # so predicting the next one asks for a copy; 5 there spaces them 1/16 s apart, as clips are.
    frame_stride: int = Field(1, ge=1)
    episodes: str | None = None  # fine-tuning: SQL over episodes choosing which train (e.g. "dataset = 'bridge'")
    holdout: float = Field(0.1, ge=0.0, lt=1.0)  # fraction of episodes / clips held out for evaluation
    shuffle_buffer: int = Field(512, ge=1)  # samples in all: each of N ranks holds 1/N of them
    episodes_per_read: int = Field(16, ge=1)  # episodes fetched from steps.lance in one filtered scan
    clips_per_read: int = Field(64, ge=1)


@dataclass(frozen=True)
class DataSpec:
    """Everything a rank needs to read its share; resolved once on the driver by `plan_data`."""

    lake: str
    stage: str
    history: int
    chunk: int
    grid: tuple[int, int]
    codebook_size: int
    tokenizer_id: str
    tokenizer_path: str | None
    table_version: int  # of clips (pretrain) or steps (finetune): every rank reads this snapshot
    train_ids: tuple[str, ...]  # clip or episode ids
    heldout_ids: tuple[str, ...]
    config: DataConfig = DataConfig()
    cameras: tuple[str, ...] = ()
    state_dim: int = 0
    action_dim: int = 0
    stats: dict = field(default_factory=dict)  # {"state": {"mean", "std"}, "action": {...}} (every dim)
    state_layout: list = field(default_factory=list)  # the model's state and action dims (robot/layout.py rows)
    action_layout: list = field(default_factory=list)
    instructions: dict = field(default_factory=dict)  # episode_id -> instruction (fine-tuning's text)
    text_embeddings: dict = field(default_factory=dict)  # instruction -> its stored embedding (fine-tuning)
    text: dict = field(default_factory=lambda: dict(NO_TEXT))  # the text model: {"model", "pretrained", "dim"}
    unigram_entropy_nats: float | None = None  # of the training tokens (pre-training's floor)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.model_dump()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        d = dict(d)
        d["config"] = DataConfig(**d["config"])
        for k in ("grid", "train_ids", "heldout_ids", "cameras"):
            d[k] = tuple(d[k])
        return cls(**d)


# -- the driver: can this lake train, and on what --------------------------------------------------


def tokenizer_codebook(path: str) -> int:
    """The number of codes of the tokenizer checkpoint at `path`."""
    from gr2.tokenizers import read_config

    config, _, _ = read_config(path)
    return int(config.num_codes)


def plan_data(lake: Lake, stage: str, history: int, chunk: int, config: DataConfig = DataConfig(),
              tokenizer: str | None = None) -> DataSpec:
    """Check `lake` can feed `stage` and resolve what each rank reads; TrainingDataError if not.

    tokenizer: the tokenizer checkpoint directory, when it is not under <lake>/models."""
    if stage not in STAGES:
        raise TrainingDataError(f"unknown stage {stage!r}: {' or '.join(STAGES)}")
    if stage == "pretrain":
        if history < 2:
            raise TrainingDataError(f"pre-training needs a history of at least 2 frames, got {history}")
        return _plan_clips(lake, history, config, tokenizer)
    return _plan_steps(lake, history, chunk, config, tokenizer)


def _resolve_tokenizer(lake: Lake, ids: set, where: str, tokenizer: str | None, what: str) -> tuple[str, str | None, int]:
    if not ids:
        raise TrainingDataError(
            f"lake {lake.root} has no tokens in {where}: {what} carry no VQ token grids. Train a tokenizer "
            f"(gr2 train-tokenizer) and tokenize the lake first.")
    if len(ids) > 1:
        raise TrainingDataError(f"{where} in lake {lake.root} hold tokens of {len(ids)} tokenizers "
                                f"({', '.join(sorted(ids))}); re-tokenize with one before training")
    tokenizer_id = next(iter(ids))
    path = tokenizer or lake.find_checkpoint("tokenizer", tokenizer_id)
    if path is None:
        raise TrainingDataError(
            f"{where} in lake {lake.root} were tokenized with tokenizer {tokenizer_id}, whose checkpoint is not "
            f"under {lake.models_dir('tokenizer')}: pass its directory as the tokenizer setting")
    from gr2.tokenizers import read_config

    _, found_id, _ = read_config(path)
    if found_id != tokenizer_id:
        raise TrainingDataError(f"tokenizer checkpoint {path} is {found_id}, but {where} were tokenized with {tokenizer_id}")
    return tokenizer_id, path, tokenizer_codebook(path)


def text_model_of(rows: list[dict], vectors: pa.DataType | None, where: str, lake: Lake) -> dict:
    """The one text model (name, weights, width) that embedded `rows`' texts; TrainingDataError for a mix."""
    made = sorted({(r["text_model"], r["text_pretrained"]) for r in rows if r.get("text_model")})
    if len(made) > 1:
        raise TrainingDataError(
            f"{where} in lake {lake.root} hold text embeddings of {len(made)} text models "
            f"({' and '.join(f'{m} weights {p!r}' for m, p in made)}): their vectors are not comparable; "
            f"re-embed with one text model before training")
    if not made:
        return dict(NO_TEXT)
    dim = vectors.list_size if vectors is not None and pa.types.is_fixed_size_list(vectors) else NO_TEXT["dim"]
    return {"model": made[0][0], "pretrained": made[0][1], "dim": int(dim)}


def _split(ids: list[str], holdout: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, held-out) by a hash of each id, so an item stays on its side as the lake grows."""
    frac = {i: int(hashlib.sha256(i.encode()).hexdigest()[:12], 16) / 16**12 for i in ids}
    held = sorted(i for i in ids if frac[i] < holdout)
    if holdout > 0 and not held and len(ids) >= 2:
        held = [min(ids, key=frac.get)]  # a tiny lake still gets something held out
    if len(held) == len(ids):
        held = held[:-1]  # and never nothing to train on
    train = sorted(set(ids) - set(held))
    return tuple(train), tuple(held)


def _plan_clips(lake: Lake, history: int, config: DataConfig, tokenizer: str | None) -> DataSpec:
    if not lake.exists("clips"):
        raise TrainingDataError(f"lake {lake.root} has no clips table: build one (gr2 build-videos) first")
    ds = lake.dataset("clips")
    names = set(ds.schema.names)
    if not {"tokens", "tokenizer_id"} <= names:
        raise TrainingDataError(f"lake {lake.root} has no tokens in clips.lance (no tokens column): train a "
                                f"tokenizer (gr2 train-tokenizer) and tokenize the clips first")
    shape_col = ["token_shape"] if "token_shape" in names else []
    text_cols = [c for c in ("text_model", "text_pretrained") if c in names]
    t = ds.to_table(columns=["clip_id", "tokenizer_id", "tokens", *shape_col, *text_cols],
                    filter="status = 'accepted' AND tokens IS NOT NULL")
    tokenizer_id, path, codebook = _resolve_tokenizer(
        lake, set(v for v in t.column("tokenizer_id").to_pylist() if v), "clips.lance", tokenizer, "accepted clips")
    grids = [_clip_grid(r.get("token_shape"), len(r["tokens"]), r["clip_id"]) for r in
             t.select(["clip_id", "tokens", *shape_col]).slice(0, 64).to_pylist()]
    hw = {g[1:] for g in grids}
    if len(hw) != 1:
        raise TrainingDataError(f"clips.lance mixes token grids of several shapes: {sorted(hw)}")
    ids = t.column("clip_id").to_pylist()
    train, held = _split(ids, config.holdout)
    lengths = pc.list_value_length(t.column("tokens")).to_numpy() // int(np.prod(next(iter(hw))))
    if int(lengths.max()) < history:
        raise TrainingDataError(f"no clip in {lake.root} has {history} tokenized frames (longest: {int(lengths.max())}); "
                                f"lower the model's history")
    counted = list(train) if len(train) <= ENTROPY_SAMPLE else random.Random(0).sample(list(train), ENTROPY_SAMPLE)
    values = pc.list_flatten(t.filter(pc.is_in(t["clip_id"], pa.array(counted))).column("tokens")).to_numpy()
    counts = np.bincount(values.astype(np.int64), minlength=codebook)
    if len(counts) > codebook:
        raise TrainingDataError(f"clips.lance holds token id {len(counts) - 1}, beyond tokenizer {tokenizer_id}'s "
                                f"{codebook} codes")
    text = text_model_of(t.select(text_cols).to_pylist() if len(text_cols) == 2 else [],
                         ds.schema.field("caption_embedding").type if "caption_embedding" in names else None,
                         "clips.lance", lake)
    return DataSpec(lake=lake.root, stage="pretrain", history=history, chunk=0, grid=next(iter(hw)),
                    codebook_size=codebook, tokenizer_id=tokenizer_id, tokenizer_path=path,
                    table_version=ds.version, train_ids=train, heldout_ids=held, config=config,
                    unigram_entropy_nats=unigram_entropy(counts), text=text)


def _clip_grid(shape, n: int, clip_id: str) -> tuple[int, int, int]:
    """(T, h, w) of a clip's flat token list, from its token_shape ([T, h, w], or [h, w])."""
    if shape and len(shape) == 3 and int(np.prod(shape)) == n:
        return tuple(int(s) for s in shape)
    if shape and len(shape) == 2 and n % (shape[0] * shape[1]) == 0:
        return (n // (shape[0] * shape[1]), int(shape[0]), int(shape[1]))
    raise TrainingDataError(f"clip {clip_id}: {n} tokens do not fit its token_shape {shape}")


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the token distribution: the loss of a model that ignores all context."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _plan_steps(lake: Lake, history: int, chunk: int, config: DataConfig, tokenizer: str | None) -> DataSpec:
    if not lake.exists("episodes") or not lake.exists("steps"):
        raise TrainingDataError(f"lake {lake.root} has no robot episodes: ingest some (gr2 ingest-robot) first")
    text_cols = [c for c in ("instruction_embedding", "text_model", "text_pretrained")
                 if c in lake.dataset("episodes").schema.names]
    layout_column = "source_action_layout" if config.action_column == "source_action" else "action_layout"
    if layout_column not in lake.dataset("episodes").schema.names:
        raise TrainingDataError(f"lake {lake.root} was ingested before episodes declared their state and action "
                                "layouts: ingest the robot data again into a new lake")
    episodes = lake.read("episodes", columns=["episode_id", "status", "cameras", "tokenizer_id", "instruction",
                                              "action_dim", "state_dim", "state_layout", layout_column, *text_cols],
                         filter=f"status = 'accepted' AND ({config.episodes})" if config.episodes else "status = 'accepted'")
    if len(episodes) == 0:
        chosen = f" matching {config.episodes!r}" if config.episodes else ""
        raise TrainingDataError(f"lake {lake.root} has no accepted robot episodes{chosen}")
    rows = episodes.to_pylist()
    tokenizer_id, path, codebook = _resolve_tokenizer(
        lake, {r["tokenizer_id"] for r in rows if r["tokenizer_id"]}, "steps.lance", tokenizer, "accepted episodes")
    untokenized = [r["episode_id"] for r in rows if r["tokenizer_id"] != tokenizer_id]
    if untokenized:
        raise TrainingDataError(f"{len(untokenized)} accepted episodes in {lake.root} have no tokens of tokenizer "
                                f"{tokenizer_id} (e.g. {untokenized[0]}); tokenize them before training")
    # before anything else about the episodes: vectors of two layouts cannot be mixed at all
    action_layout = _one_layout(rows, layout_column)
    state_layout = _select_layout(_one_layout(rows, "state_layout"), config.state_dims)
    cameras = tuple(config.cameras) or tuple(rows[0]["cameras"] or ())
    for r in rows:
        missing = [c for c in cameras if c not in (r["cameras"] or [])]
        if missing:
            raise TrainingDataError(f"episode {r['episode_id']} has no camera {missing[0]} (has {r['cameras']})")
    steps = lake.dataset("steps")
    if config.action_column not in steps.schema.names:
        raise TrainingDataError(f"steps.lance has no column {config.action_column!r}")
    ids = [r["episode_id"] for r in rows]
    train, held = _split(ids, config.holdout)

    first = steps.to_table(columns=["views", "state", config.action_column],
                           filter=f"episode_id = {sql_literal(train[0])}", limit=64)
    shapes = {tuple(v["token_shape"]) for vs in first.column("views").to_pylist() for v in vs
              if v["camera"] in cameras and v["token_shape"]}
    if len(shapes) != 1:
        raise TrainingDataError(f"episode {train[0]}: views carry token grids of shapes {sorted(shapes)}; expected one")
    stats, state_dim, action_dim = _robot_stats(steps, train, config)
    text = text_model_of(rows, episodes.schema.field("instruction_embedding").type if text_cols else None,
                         "episodes.lance", lake)
    # one vector per distinct instruction: tasks repeat theirs over many episodes
    embeddings = {r["instruction"]: r["instruction_embedding"] for r in rows
                  if r["instruction"] and r.get("instruction_embedding") is not None}
    return DataSpec(lake=lake.root, stage="finetune", history=history, chunk=chunk, grid=next(iter(shapes)),
                    codebook_size=codebook, tokenizer_id=tokenizer_id, tokenizer_path=path,
                    table_version=steps.version, train_ids=train, heldout_ids=held, config=config,
                    cameras=cameras, state_dim=state_dim, action_dim=action_dim, stats=stats,
                    state_layout=lay.to_rows(state_layout), action_layout=lay.to_rows(action_layout),
                    instructions={r["episode_id"]: r["instruction"] or "" for r in rows},
                    text_embeddings=embeddings, text=text)


def _one_layout(rows: list[dict], column: str) -> lay.Layout:
    """The layout every training episode declares for `column`; refused when two differ (their
    vectors would be mixed dimension by dimension)."""
    first = lay.from_rows(rows[0][column])
    for r in rows[1:]:
        other = lay.from_rows(r[column])
        if not lay.same(first, other):
            raise TrainingDataError(
                f"episodes {rows[0]['episode_id']} and {r['episode_id']} declare different {column.replace('_', ' ')}s "
                f"({', '.join(lay.names(first))} vs {', '.join(lay.names(other))}): train on one with --where")
    return first


def _select_layout(layout: lay.Layout, dims: tuple[int, ...] | None) -> lay.Layout:
    if dims is not None and max(dims) >= len(layout):
        raise TrainingDataError(f"state dims {list(dims)} do not exist in a state of width {len(layout)}")
    return lay.select(layout, dims)


def _robot_stats(steps, train: tuple[str, ...], config: DataConfig) -> tuple[dict, int, int]:
    """Mean/std of every state and action dim over the training episodes.

    Computed here rather than read from the lake's stats file because training normalises its own
    choice of columns and dims, over its own split; the stats go into every checkpoint so the policy
    undoes exactly this. A binary gripper's are unused: layout.to_model makes it -1/+1, its label."""
    t = steps.to_table(columns=["episode_id", "state", config.action_column],
                       filter=f"episode_id IN ({', '.join(sql_literal(i) for i in train)})")
    state = _select(np.asarray(t.column("state").to_pylist(), np.float64), config.state_dims, "state")
    actions = [a for a in t.column(config.action_column).to_pylist() if a is not None]
    if not actions:
        raise TrainingDataError(f"steps of the training episodes have no {config.action_column!r} values")
    action = np.asarray(actions, np.float64)
    return ({"state": _mean_std(state), "action": _mean_std(action)}, state.shape[1], action.shape[1])


def _mean_std(x: np.ndarray) -> dict:
    s = act.compute_stats(x)
    # a dimension that never moves (Meta-World's gripper opening, a fixed wrist angle) is centred,
    # not blown up by a near-zero std at the first step that does move
    std = np.where(np.asarray(s["std"]) < 1e-4, 1.0, np.asarray(s["std"]))
    return {"mean": s["mean"], "std": std.tolist()}


def _select(state: np.ndarray, dims: tuple[int, ...] | None, what: str) -> np.ndarray:
    if dims is None:
        return state
    if state.ndim != 2 or max(dims) >= state.shape[1]:
        raise TrainingDataError(f"{what} dims {list(dims)} do not exist in {what} of width {state.shape[-1]}")
    return state[:, list(dims)]


# -- a rank's samples -----------------------------------------------------------------------------


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Items in a random order drawn from a buffer of `size` (TF-style streaming shuffle)."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _ids_for(spec: DataSpec, split: str) -> tuple[str, ...]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return spec.train_ids if split == "train" else spec.heldout_ids


def iter_samples(spec: DataSpec, rank: int = 0, world: int = 1, split: str = "train", seed: int = 0,
                 epochs: int | None = None, shuffle: bool = True) -> Iterator[dict]:
    """This rank's samples, epoch after epoch (forever when epochs is None), through its share of the
    shuffle buffer."""
    rng = random.Random(f"{seed}:{rank}")
    # Samples stream episode by episode (clip by clip), so a batch mixes only the items its buffer
    # spans. Split over the ranks, the buffer spans as many items per global batch on N workers as on
    # one; whole per rank, two workers' batches mixed ~40% more episodes and their loss fell faster.
    buffer = max(1, math.ceil(spec.config.shuffle_buffer / world))
    epoch = 0
    while epochs is None or epoch < epochs:
        if spec.stage == "pretrain":
            stream = _clip_samples(spec, rank, world, split, seed + epoch, shuffle)
        else:
            stream = _episode_samples(spec, rank, world, split, seed + epoch, shuffle)
        count = 0
        for sample in shuffle_buffer(stream, buffer, rng) if shuffle else stream:
            count += 1
            yield sample
        if count == 0:  # rather than loop forever over an empty shard
            raise TrainingDataError(f"rank {rank} of {world} has no {split} samples in {spec.lake} "
                                    f"({len(_ids_for(spec, split))} {split} items): fewer workers, or more data")
        epoch += 1


def _clip_samples(spec: DataSpec, rank: int, world: int, split: str, seed: int, shuffle: bool) -> Iterator[dict]:
    wanted = set(_ids_for(spec, split))
    ds = _open(spec.lake, "clips", spec.table_version)
    names = ds.schema.names
    columns = ["clip_id", "tokens", *(["token_shape"] if "token_shape" in names else []),
               *(["caption_embedding"] if "caption_embedding" in names else [])]
    # Every rank scans in the same order and keeps every world-th clip, the assignment rotating
    # with the epoch (Lance's ShardedBatchSampler does the same, but in pylance 14.0.2 fails on a
    # batch that leaves a rank no rows: pyarrow cannot take an empty, null-typed index list).
    offset = (seed if shuffle else 0) + rank
    scanner = ds.scanner(columns=columns, batch_size=spec.config.clips_per_read, scan_in_order=True,
                         filter=f"status = 'accepted' AND tokens IS NOT NULL AND tokenizer_id = {sql_literal(spec.tokenizer_id)}")
    i = 0
    for batch in scanner.to_batches():
        for row in batch.to_pylist():
            i += 1
            if (i - 1 + offset) % world or row["clip_id"] not in wanted:
                continue
            n_frames, gh, gw = _clip_grid(row.get("token_shape"), len(row["tokens"]), row["clip_id"])
            grid = np.asarray(row["tokens"], np.int64).reshape(n_frames, 1, gh * gw)
            text = text_vector(spec, row.get("caption_embedding"))
            for start in range(0, n_frames - spec.history + 1):
                yield {"frames": grid[start:start + spec.history], "text_embedding": text,
                       "id": f"{row['clip_id']}@{start}"}


def text_vector(spec: DataSpec, embedding) -> np.ndarray:
    """A stored text embedding as float32; zeros (the model's "no text") where the lake holds none."""
    if embedding is None:
        return np.zeros(spec.text["dim"], np.float32)
    return np.asarray(embedding, np.float32)


def _open(lake_root: str, table: str, version: int):
    return Lake(lake_root).dataset(table, version)


def _episode_samples(spec: DataSpec, rank: int, world: int, split: str, seed: int, shuffle: bool) -> Iterator[dict]:
    ids = list(_ids_for(spec, split))
    if shuffle:
        random.Random(seed).shuffle(ids)  # the same permutation on every rank: each takes its own slice
    # fewer episodes than ranks (a tiny lake): ranks share episodes rather than one of them idling,
    # which under DDP would hang every other rank at its next all-reduce
    mine = ids[rank::world] if len(ids) >= world else [ids[(rank + seed) % len(ids)]]
    ds = _open(spec.lake, "steps", spec.table_version)
    columns = ["episode_id", "step", "state", spec.config.action_column, "views"]
    group = spec.config.episodes_per_read
    for start in range(0, len(mine), group):
        chunk_ids = mine[start:start + group]
        table = ds.to_table(columns=columns, filter=f"episode_id IN ({', '.join(sql_literal(i) for i in chunk_ids)})")
        table = table.take(pc.sort_indices(table, [("episode_id", "ascending"), ("step", "ascending")]))
        episode_col = table.column("episode_id").to_numpy(zero_copy_only=False)
        for episode_id in chunk_ids:
            rows = np.flatnonzero(episode_col == episode_id)
            if len(rows):
                text = text_vector(spec, spec.text_embeddings.get(spec.instructions.get(episode_id, "")))
                yield from episode_windows(table.take(rows), spec, episode_id, text)


def episode_arrays(steps: pa.Table, spec: DataSpec, episode_id: str = "") -> dict[str, np.ndarray]:
    """One episode's steps (sorted by step) as arrays: tokens (n, V, h*w), view_ok (n, V), state, action."""
    n, (h, w) = len(steps), spec.grid
    views = steps.column("views").to_pylist()
    tokens = np.zeros((n, len(spec.cameras), h * w), np.int64)
    ok = np.zeros((n, len(spec.cameras)), bool)
    for i, step_views in enumerate(views):
        by_camera = {v["camera"]: v for v in step_views}
        for j, camera in enumerate(spec.cameras):
            v = by_camera.get(camera)
            if v is None or not v["ok"]:
                continue  # flagged: the window that needs it is skipped, never filled
            if v["tokens"] is None or len(v["tokens"]) != h * w:
                raise TrainingDataError(f"episode {episode_id} step {i} camera {camera}: no token grid of {h}x{w}")
            tokens[i, j] = v["tokens"]
            ok[i, j] = True
    state, action, missing = act.step_arrays(steps, "state", spec.config.action_column, spec.action_dim)
    state = _select(state, spec.config.state_dims, "state")
    return {"tokens": tokens, "view_ok": ok, "state": state, "action": action, "action_missing": missing}


def episode_windows(steps: pa.Table, spec: DataSpec, episode_id: str = "",
                    text: np.ndarray | None = None) -> Iterator[dict]:
    """Every (history window, action chunks) sample of one episode whose views are all present;
    text: the instruction's stored embedding (None: no instruction)."""
    text = text if text is not None else text_vector(spec, None)
    arrays = episode_arrays(steps, spec, episode_id)
    # as the declared layouts say: regressed dims zero-mean unit-std, binary grippers -1/+1
    state = lay.to_model(arrays["state"], spec.stats["state"], lay.from_rows(spec.state_layout)).astype(np.float32)
    action = lay.to_model(arrays["action"], spec.stats["action"], lay.from_rows(spec.action_layout))
    w = act.windows(state, action.astype(np.float32), arrays["action_missing"], spec.history, spec.chunk,
                    spec.config.frame_stride)
    step_ok = arrays["view_ok"].all(1)
    for t in range(len(steps)):
        hist = w["history_index"][t]
        if not step_ok[hist].all():
            continue
        yield {
            "frames": arrays["tokens"][hist],
            "state": w["state"][t],
            "action": w["action"][hist],  # each history step's own chunk
            "action_is_pad": w["action_is_pad"][hist],
            "step_is_pad": w["state_is_pad"][t],
            "text_embedding": text,
            "id": f"{episode_id}@{t}",
        }


def collate(samples: list[dict]) -> dict:
    """Samples -> a batch of torch tensors (ids stay a list of strings)."""
    import torch

    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = values if key == "id" else torch.as_tensor(np.stack(values))
    return out


def iter_batches(spec: DataSpec, batch_size: int, rank: int = 0, world: int = 1, split: str = "train",
                 seed: int = 0, epochs: int | None = None, shuffle: bool = True) -> Iterator[dict]:
    """Batches of `batch_size` of this rank's samples; the last partial batch of a finite run too."""
    buf = []
    for sample in iter_samples(spec, rank, world, split, seed, epochs, shuffle):
        buf.append(sample)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)

