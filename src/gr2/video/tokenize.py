"""VQ tokens for clips: the build's tokenize stage, re-tokenizing a lake, and reconstructions for people.

A clip's tokens come from its sampled frames (`clips.sampled_frames`) decoded as the build decodes
them (short side to the build's `frame_size`, centre-cropped square), resized to the tokenizer's
resolution and encoded into a uint16 grid [T, h, w], stored row-major beside its shape and the
checkpoint id. Whichever path tokenizes a clip (the build's stage or `tokenize_lake`), the same
checkpoint gives the same tokens.

Checkpoints live where the lake's models registry keeps tokenizers (Lake.models_dir("tokenizer")).
A lake keeps one tokenizer at a time: the build uses the one its clips already carry (the latest
trained when none do), and `tokenize_lake` moves every accepted clip onto the checkpoint it is given.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from gr2.errors import Gr2Error
from gr2.lake.lake import Lake, LakeError, actor_args, worker_env
from gr2.lake.query import sql_literal
from gr2.progress import progress
from gr2.video import decode, probe

DEFAULT_FRAME_SIZE = 128  # BuildConfig's default, for a clip whose frame size nothing records
TOKEN_COLUMNS = ("tokenizer_id", "tokens", "token_shape")


class TokenizeError(Gr2Error):
    """A clip that cannot be shown or tokenized as asked; the message names the clip."""


# -- which tokenizer a lake's clips use ------------------------------------------------------------


def lake_tokenizer_ids(lake: Lake) -> Counter:
    """How many accepted clips carry tokens of each tokenizer."""
    if not lake.exists("clips") or "tokenizer_id" not in lake.dataset("clips").schema.names:
        return Counter()
    ids = lake.read("clips", columns=["tokenizer_id"], filter="status = 'accepted' AND tokenizer_id IS NOT NULL")
    return Counter(ids.column("tokenizer_id").to_pylist())


def current_tokenizer(lake: Lake, tokenizer_id: str | None = None) -> str | None:
    """The checkpoint a build should tokenize with: `tokenizer_id` when given (an id or a unique prefix;
    TokenizeError when the lake lacks it), else the one the lake's clips already carry (so a build never
    mixes tokenizers in one lake), else the latest trained; None when the lake has none."""
    if tokenizer_id is None:
        in_use = lake_tokenizer_ids(lake)
        if not in_use:
            return lake.find_checkpoint("tokenizer")
        tokenizer_id = in_use.most_common(1)[0][0]
    path = lake.find_checkpoint("tokenizer", tokenizer_id)
    if path is None:
        have = ", ".join(s.checkpoint_id for s in lake.checkpoints("tokenizer")) or "none"
        raise TokenizeError(f"tokenizer {tokenizer_id} is not under {lake.models_dir('tokenizer')} "
                            f"(tokenizers there: {have})")
    return path


# -- frames as the tokenizer sees them ------------------------------------------------------------


def to_resolution(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 frames [N, H, W, 3] -> [N, size, size, 3]: centre-cropped square, then resized (antialiased)."""
    frames = np.asarray(frames)
    if frames.shape[1:3] == (size, size):
        return frames
    side = min(frames.shape[1:3])
    square = decode.center_crop(frames, side)
    # Pillow widens its bilinear filter when shrinking, so a downscale averages rather than aliases.
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BILINEAR)) for f in square])


def clip_frames(path: str, width: int, height: int, indices: list[int], frame_size: int, resolution: int) -> np.ndarray:
    """A clip's frames at `indices`, decoded as the build decodes them, at the tokenizer's `resolution`."""
    w, h = decode.fit_size(int(width), int(height), int(frame_size))
    frames = decode.center_crop(decode.VideoReader(path, w, h).get(indices), int(frame_size))
    return to_resolution(frames, resolution)


def decode_clip_frames(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Stage: `frames` (one [T, r, r, 3] array per clip) from uri/width/height/frame_size/indices.

    A clip whose video cannot be read or decoded gets status "failed" and the error as its reason.
    """
    n = len(batch["clip_id"])
    frames, status, reason = [], [], []
    for i in range(n):
        indices = [int(x) for x in batch["indices"][i]]
        try:
            if batch["width"][i] is None or batch["height"][i] is None:
                raise decode.DecodeError(f"{batch['uri'][i]}: its video has no row with a size in the lake")
            path = probe.local_copy(str(batch["uri"][i]))
            got = clip_frames(path, batch["width"][i], batch["height"][i], indices, batch["frame_size"][i], resolution)
            status.append("accepted"), reason.append("")
        except (decode.DecodeError, probe.ProbeError, OSError) as e:
            got = np.zeros((len(indices), resolution, resolution, 3), np.uint8)
            status.append("failed"), reason.append(str(e) if not isinstance(e, OSError) else f"{batch['uri'][i]}: {e}")
        frames.append(got)
    return {**batch, "frames": _objects(frames), "status": np.array(status, dtype=object),
            "reason": np.array(reason, dtype=object)}


# -- the stage ------------------------------------------------------------------------------------


class FrameTokenizer:
    """uint8 frames [N, H, W, 3] -> uint16 token grids [N, h, w] with a tokenizer checkpoint.

    The hook for gr2.tokenizers: anything with a `checkpoint_id` and this call signature will do.
    """

    def __init__(self, checkpoint: str, batch_size: int = 32):
        # Imported here: torch loads only in workers that tokenize.
        from gr2.tokenizers.checkpoint import load_checkpoint

        loaded = load_checkpoint(checkpoint)
        self.model, self.checkpoint_id, self.batch_size = loaded.tokenizer.eval(), loaded.checkpoint_id, batch_size

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(frames), self.batch_size):
            chunk = np.ascontiguousarray(frames[start:start + self.batch_size].transpose(0, 3, 1, 2))
            out.append(self.model.encode(chunk).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0, 0), np.int64)


class TokenizeClips:
    """Stage: `tokens`, `token_shape` and `tokenizer_id` for the accepted clips of a batch.

    The model loads once in __init__, so Ray runs this as an actor pool. `frames` is the build's
    [N, T, S, S, 3] array (or one [T, S, S, 3] array per clip); frames are resized to `resolution`
    (default: the checkpoint's training resolution). Clips that are not accepted get an empty grid,
    shape (0, 0, 0) and no tokenizer id: Ray cannot put None beside arrays in one column.
    """

    def __init__(self, checkpoint_dir: str, resolution: int | None = None, batch_size: int = 64):
        self.encoder = FrameTokenizer(checkpoint_dir, batch_size)
        self.tokenizer_id = self.encoder.checkpoint_id
        config = self.encoder.model.config
        self.resolution = int(resolution or config.resolution)
        self.grid = self.encoder.model.grid_shape(self.resolution, self.resolution)  # checks divisibility

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["clip_id"])
        status = [str(s) for s in batch["status"]] if "status" in batch else ["accepted"] * n
        live = [i for i in range(n) if status[i] == "accepted"]
        tokens = _objects([np.zeros(0, np.uint16)] * n)
        shapes = np.zeros((n, 3), np.int32)
        ids = np.array([None] * n, dtype=object)
        if live:
            frames = [to_resolution(np.asarray(batch["frames"][i]), self.resolution) for i in live]
            # The tokenizer's config caps its codebook at 65536 codes, so every id fits uint16.
            grids = self.encoder(np.concatenate(frames)).astype(np.uint16)
            bounds = np.cumsum([0] + [len(f) for f in frames])
            for j, i in enumerate(live):
                tokens[i] = grids[bounds[j]:bounds[j + 1]].reshape(-1)
                shapes[i] = (len(frames[j]), *self.grid)
                ids[i] = self.tokenizer_id
        return {**batch, "tokens": tokens, "token_shape": shapes, "tokenizer_id": ids}


def build_tokenizer(lake: Lake, tokenizer_id: str | None = None) -> str | None:
    """The checkpoint the build's tokenize stage uses (see `current_tokenizer`), or None when the lake
    has none. It is loaded and verified here, on the driver, so a corrupt one stops the build before
    any video is read."""
    from gr2.tokenizers import load_checkpoint

    path = current_tokenizer(lake, tokenizer_id)
    if path is not None:
        load_checkpoint(path)
    return path


def tokenize_after_build(lake: Lake, checkpoint_dir: str | None, build_id: str, log=print) -> dict:
    """After a build: tokenize the accepted clips the build did not pass through its stage (clips of
    earlier builds, or of another tokenizer); returns the funnel's entries."""
    if checkpoint_dir is None:
        return {"tokenized": 0, "tokenize_skipped": "no tokenizer"}
    rest = tokenize_lake(lake, checkpoint_dir, only_missing=True, log=log)
    in_build = lake.dataset("clips").count_rows(
        f"build_id = {sql_literal(build_id)} AND tokenizer_id = {sql_literal(rest.tokenizer_id)}") \
        if lake.exists("clips") else 0
    earlier = rest.tokenized - rest.by_build.get(build_id, 0)  # this build's own clips are in `in_build`
    entry = {"tokenized": in_build + earlier, "tokenized_from_earlier_builds": earlier, "tokenizer": rest.tokenizer_id}
    if rest.failed:
        entry["tokenize_failed"] = rest.failed
    return entry


# -- re-tokenizing a lake -------------------------------------------------------------------------


@dataclass
class TokenizeResult:
    """What one `tokenize_lake` pass did."""

    tokenizer_id: str
    checkpoint: str
    accepted: int = 0  # accepted clips in the lake
    tokenized: int = 0  # clips given tokens in this pass
    already: int = 0  # accepted clips that already carried this tokenizer's tokens
    failed: int = 0  # clips whose frames could not be decoded (left as they were)
    failures: list[str] = field(default_factory=list)
    by_build: dict[str, int] = field(default_factory=dict)  # clips tokenized, by the build that made them
    seconds: float = 0.0
    frames: int = 0

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "by_build"}


def frame_sizes(lake: Lake) -> dict[str, int]:
    """{build_id: frame_size} from the builds table (the frame size each build decoded clips at)."""
    out = {}
    for row in lake.read("builds", columns=["build_id", "config_json"]).to_pylist():
        try:
            size = json.loads(row["config_json"] or "{}").get("frame_size")
        except ValueError:
            size = None
        if size:
            out[row["build_id"]] = int(size)
    return out


def clip_items(lake: Lake, where: str, columns: tuple[str, ...] = ()) -> list[dict]:
    """Accepted clips matching `where`, with what decoding their frames needs: uri, width, height,
    frame_size (from the builds table) and the sampled frame indices."""
    clips = lake.read("clips", columns=["clip_id", "video_id", "uri", "sampled_frames", "build_id", "thumbnail",
                                        *columns], filter=where).to_pylist()
    if not clips:
        return []
    videos = {r["video_id"]: r for r in lake.read("videos", columns=["video_id", "width", "height"]).to_pylist()}
    sizes = frame_sizes(lake)
    items = []
    for c in clips:
        v = videos.get(c["video_id"]) or {}
        thumbnail = c.pop("thumbnail")
        items.append({**c, "width": v.get("width"), "height": v.get("height"),
                      "frame_size": sizes.get(c["build_id"]) or _thumbnail_side(thumbnail) or DEFAULT_FRAME_SIZE,
                      "indices": list(c.pop("sampled_frames") or [])})
    return items


def _thumbnail_side(jpeg: bytes | None) -> int | None:
    """The side of a clip's square thumbnail: its sampled frames' size when no build row records it
    (a build killed before it wrote its row in the builds ledger)."""
    if not jpeg:
        return None
    try:
        with Image.open(io.BytesIO(jpeg)) as im:  # reads the header only
            return im.width if im.width == im.height else None
    except OSError:
        return None


def tokenize_lake(lake: Lake, checkpoint_dir: str, only_missing: bool = True, actors: int | tuple[int, int] = 1,
                  decoders: int | None = None, commit_every: int = 256, log=print) -> TokenizeResult:
    """Give every accepted clip tokens of `checkpoint_dir`'s tokenizer, through `Lake.update`.

    only_missing: leave clips that already carry this tokenizer's tokens alone (a re-run redoes
    nothing); clips of another tokenizer are re-tokenized either way. False: redo every clip.
    The checkpoint is loaded and verified before anything else, so a bad one costs no work.
    """
    import ray

    from gr2.tokenizers import load_checkpoint

    t0 = time.perf_counter()
    checkpoint = load_checkpoint(checkpoint_dir)
    tid, resolution = checkpoint.checkpoint_id, checkpoint.tokenizer.config.resolution
    del checkpoint
    result = TokenizeResult(tid, checkpoint_dir)
    if not lake.exists("clips"):
        return result
    names = lake.dataset("clips").schema.names
    missing = [c for c in TOKEN_COLUMNS if c not in names]
    if missing:
        raise LakeError(f"clips.lance in {lake.root} has no {missing} columns (written before clips carried tokens)")
    ds = lake.dataset("clips")
    result.accepted = ds.count_rows("status = 'accepted'")
    where = "status = 'accepted'"
    if only_missing:
        where += f" AND (tokenizer_id IS NULL OR tokenizer_id != {sql_literal(tid)})"
    items = clip_items(lake, where)
    result.already = result.accepted - len(items)
    log(f"tokenizer {tid}: {len(items)} of {result.accepted} accepted clips to tokenize")
    if not items:
        result.seconds = time.perf_counter() - t0
        return result

    workers = decoders or max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    built = {r["clip_id"]: r["build_id"] for r in items}
    blocks = max(1, min(len(items), workers * 4))
    ds = (
        ray.data.from_items([{k: r[k] for k in ("clip_id", "uri", "width", "height", "frame_size", "indices")}
                             for r in items], override_num_blocks=blocks)
        .map_batches(decode_clip_frames, fn_kwargs={"resolution": resolution}, batch_size=4,
                     compute=ray.data.TaskPoolStrategy(min(workers, blocks)),  # no more tasks than blocks
                     **worker_env())
        .map_batches(TokenizeClips, fn_constructor_args=(checkpoint_dir,), batch_size=8, compute=_actor_pool(actors),
                     **actor_args())
        .map_batches(_token_columns, batch_size=None)
    )
    by_build: Counter = Counter()
    with progress(len(items), "tokenize: clips", "clip") as bar:
        _commit_tokens(lake, ds, commit_every, result, built, by_build, bar)
    result.by_build = dict(by_build)
    result.seconds = time.perf_counter() - t0
    log(f"tokenizer {tid}: {result.tokenized} clips tokenized, {result.failed} failed, "
        f"{result.frames / max(result.seconds, 1e-9):.1f} frames/s")
    return result


def _commit_tokens(lake, ds, commit_every: int, result, built: dict, by_build: Counter, bar) -> None:
    for batch in ds.iter_batches(batch_size=commit_every, batch_format="pyarrow"):
        ok = pc.equal(batch["status"], "accepted")
        done = batch.filter(ok)
        for row in batch.filter(pc.invert(ok)).select(["reason"]).to_pylist():
            result.failed += 1
            if len(result.failures) < 20:
                result.failures.append(row["reason"])
        if len(done):
            lake.update("clips", done.select(["clip_id", *TOKEN_COLUMNS]))
            result.tokenized += len(done)
            result.frames += int(pc.sum(pc.list_element(done["token_shape"], 0)).as_py() or 0)
            by_build.update(built[c] for c in done.column("clip_id").to_pylist())
        bar.update(len(batch))


def _token_columns(batch: dict[str, np.ndarray]) -> pa.Table:
    """Last stage of `tokenize_lake`: the id, the token columns (typed as the lake's) and the outcome."""
    from gr2.lake import schema

    grids = [np.asarray(t, np.uint16).reshape(-1) for t in batch["tokens"]]
    offsets = np.cumsum([0] + [len(g) for g in grids]).astype(np.int32)
    values = np.concatenate(grids) if grids else np.zeros(0, np.uint16)
    ok = [s == "accepted" for s in batch["status"]]
    fields = schema.CLIPS
    return pa.table({
        "clip_id": pa.array([str(c) for c in batch["clip_id"]], pa.string()),
        "tokenizer_id": pa.array([t if k else None for t, k in zip(batch["tokenizer_id"], ok)], pa.string()),
        "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.uint16()),
                                           mask=pa.array([not k for k in ok])).cast(fields.field("tokens").type),
        "token_shape": pa.array([list(map(int, s)) if k else None for s, k in zip(batch["token_shape"], ok)],
                                fields.field("token_shape").type),
        "status": pa.array([str(s) for s in batch["status"]], pa.string()),
        "reason": pa.array([str(r) if r else None for r in batch["reason"]], pa.string()),
    })


# -- reconstructions for people -------------------------------------------------------------------


def reconstruction_sheet(lake: Lake, clip_id: str, min_side: int = 128) -> tuple[np.ndarray, dict]:
    """One image: a clip's sampled frames (top row, as the tokenizer saw them) over their reconstruction
    from the stored tokens (bottom row), each frame scaled up to at least `min_side` pixels.

    Returns (uint8 [H, W, 3], facts: clip_id, tokenizer_id, token_shape, psnr_db).
    """
    from gr2.tokenizers import load_checkpoint

    row = _one_clip(lake, clip_id)
    if row.get("tokens") is None or not row.get("tokenizer_id") or not len(row["tokens"]):
        hint = "it was not accepted" if row["status"] != "accepted" else "run `gr2 tokenize` first"
        raise TokenizeError(f"clip {row['clip_id']} has no tokens (status {row['status']}; {hint})")
    checkpoint = load_checkpoint(current_tokenizer(lake, row["tokenizer_id"]))
    t, h, w = (int(x) for x in row["token_shape"])
    grid = np.asarray(row["tokens"], np.int64).reshape(t, h, w)
    recon = (checkpoint.tokenizer.decode(grid).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    size = recon.shape[1]
    item = clip_items(lake, f"clip_id = {sql_literal(row['clip_id'])}")[0]
    try:
        original = clip_frames(probe.local_copy(item["uri"]), item["width"], item["height"], item["indices"],
                               item["frame_size"], size)
    except (decode.DecodeError, probe.ProbeError, OSError) as e:
        raise TokenizeError(f"clip {row['clip_id']}: cannot decode its frames from {item['uri']} ({e})") from None
    mse = np.mean((original.astype(np.float64) - recon.astype(np.float64)) ** 2)
    psnr = float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf")
    scale = max(1, -(-min_side // size))
    rows = [np.concatenate(list(frames), axis=1) for frames in (original, recon)]
    sheet = np.concatenate(rows, axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    return sheet, {"clip_id": row["clip_id"], "tokenizer_id": row["tokenizer_id"], "token_shape": [t, h, w],
                   "psnr_db": round(psnr, 2)}


def _one_clip(lake: Lake, clip_id: str) -> dict:
    if not lake.exists("clips"):
        raise TokenizeError(f"no clips in lake {lake.root}")
    clip_id = clip_id.strip()
    if not clip_id or not all(c.isalnum() or c in "-_" for c in clip_id):
        raise TokenizeError(f"{clip_id!r} is not a clip id")
    names = lake.dataset("clips").schema.names
    columns = ["clip_id", "status", *[c for c in TOKEN_COLUMNS if c in names]]
    rows = lake.read("clips", columns=columns, filter=f"clip_id LIKE {sql_literal(clip_id + '%')}").to_pylist()
    exact = [r for r in rows if r["clip_id"] == clip_id]
    rows = exact or rows
    if not rows:
        raise TokenizeError(f"no clip {clip_id} in lake {lake.root}")
    if len(rows) > 1:
        raise TokenizeError(f"clip id prefix {clip_id} matches {len(rows)} clips; give more of it")
    return rows[0]


def _actor_pool(actors: int | tuple[int, int]):
    import ray.data

    low, high = (actors, actors) if isinstance(actors, int) else actors
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


def _objects(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


