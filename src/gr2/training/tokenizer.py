"""Training a lake's tokenizer: frames sampled from the lake on Ray, then gr2.tokenizers.train in
this process (one worker) or under Ray Train's TorchTrainer (torch DDP, gloo on CPU).

Frames are what the tokenize stage will feed the tokenizer: accepted clips decoded as the build
decodes them (gr2.video.tokenize `clip_frames`) and, once the lake has robot steps, their camera
JPEGs, centre-cropped and resized alike. Held-out frames come from clips and episodes that give no
training frame, so the reported PSNR and codebook usage are on footage the model never saw.
The checkpoint lands under <lake>/models/tokenizers/<checkpoint id>/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from PIL import Image

from gr2.errors import Gr2Error
from gr2.lake.lake import Lake, worker_env
from gr2.progress import progress
from gr2.training.launcher import check_cluster, launch
from gr2.video import shots
from gr2.video.tokenize import clip_items, decode_clip_frames, to_resolution


class TokenizerTrainingError(Gr2Error):
    """A lake or a request the tokenizer cannot be trained from; the message says what is missing."""


@dataclass(frozen=True)
class SampleConfig:
    """Which frames the tokenizer trains and is measured on."""

    frames_per_clip: int = 32  # spread evenly over each clip's span (more than the clip's stored frames)
    max_clip_frames: int = 20_000  # clips are drawn at random until this many frames
    max_robot_frames: int = 5_000  # camera frames drawn at random from steps.lance
    held_out: float = 0.1  # fraction of clips (and of episodes) kept for measurement
    max_held_out_frames: int = 1_024
    seed: int = 0


@dataclass
class FrameSample:
    """uint8 frames [N, r, r, 3] to train on and to measure on, and where they came from."""

    train: np.ndarray
    held_out: np.ndarray
    counts: dict = field(default_factory=dict)  # clips/episodes/frames, train and held out; decode failures


@dataclass
class TrainedTokenizer:
    """What a training run produced: the checkpoint, its held-out numbers and what it saw."""

    checkpoint_id: str
    checkpoint: str
    eval: dict  # held out: psnr_db, codebook_usage, perplexity, reencode_agreement
    steps: int
    seconds: float
    workers: int
    frames: dict
    final_loss: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- frames -------------------------------------------------------------------------------------------


def _held_out(unit: str, fraction: float, seed: int) -> bool:
    """Whether a clip or episode is held out: a hash, so the split is stable as the lake grows."""
    h = int(hashlib.sha256(f"{seed}:{unit}".encode()).hexdigest()[:8], 16)
    return h < fraction * 0xFFFFFFFF


def _split(units: list[str], fraction: float, seed: int) -> set[str]:
    """The held-out units; with two or more units, at least one is held out and at least one is not."""
    held = {u for u in units if _held_out(u, fraction, seed)}
    if len(units) >= 2 and fraction > 0:
        ranked = sorted(units, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())
        if not held:
            held = {ranked[0]}
        if len(held) == len(units):
            held.discard(ranked[-1])
    return held


def sample_clip_frames(lake: Lake, resolution: int, config: SampleConfig,
                       workers: int) -> tuple[dict[str, np.ndarray], int]:
    """({clip_id: frames [n, r, r, 3]}, clips that failed to decode) from accepted clips drawn at
    random, decoded on Ray."""
    import ray

    if not lake.exists("clips"):
        return {}, 0
    items = clip_items(lake, "status = 'accepted'", columns=("start_frame", "end_frame"))
    rng = np.random.default_rng(config.seed)
    rng.shuffle(items)
    items = items[: max(1, config.max_clip_frames // config.frames_per_clip)]
    for it in items:
        it["indices"] = shots.sample_indices(int(it["start_frame"]), int(it["end_frame"]), config.frames_per_clip)
    if not items:
        return {}, 0
    keep = ("clip_id", "uri", "width", "height", "frame_size", "indices")
    blocks = max(1, min(len(items), workers * 4))
    ds = ray.data.from_items([{k: it[k] for k in keep} for it in items], override_num_blocks=blocks)
    ds = ds.map_batches(decode_clip_frames, fn_kwargs={"resolution": resolution}, batch_size=4,
                        compute=ray.data.TaskPoolStrategy(min(workers, blocks)),  # no more tasks than blocks
                        **worker_env())
    out, failed = {}, 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for clip_id, status, frames in zip(batch["clip_id"], batch["status"], batch["frames"]):
            if status == "accepted":
                out[str(clip_id)] = np.asarray(frames, np.uint8)
            else:
                failed += 1
    return out, failed


def decode_jpegs(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Stage: camera JPEGs -> `frames` uint8 [N, r, r, 3], centre-cropped and resized as clips are;
    `ok` false (and a black frame) where a JPEG does not decode."""
    frames, ok = [], []
    for jpeg in batch["jpeg"]:
        try:
            with Image.open(io.BytesIO(bytes(jpeg))) as im:
                frames.append(to_resolution(np.asarray(im.convert("RGB"))[None], resolution)[0])
                ok.append(True)
        except OSError:  # PIL's UnidentifiedImageError and truncated files
            frames.append(np.zeros((resolution, resolution, 3), np.uint8))
            ok.append(False)
    return {"episode_id": batch["episode_id"], "frames": np.stack(frames), "ok": np.array(ok)}


def sample_robot_frames(lake: Lake, resolution: int, config: SampleConfig,
                        workers: int) -> tuple[dict[str, np.ndarray], int]:
    """({episode_id: frames}, JPEGs that did not decode) from the cameras of random steps of accepted
    episodes."""
    import ray

    if not lake.exists("steps") or not lake.exists("episodes") or config.max_robot_frames <= 0:
        return {}, 0
    accepted = set(lake.read("episodes", columns=["episode_id"], filter="status = 'accepted'")
                   .column("episode_id").to_pylist())
    ds = lake.dataset("steps")
    n = ds.count_rows()
    if not n or not accepted:
        return {}, 0
    rng = np.random.default_rng(config.seed)
    rows = ds.take(np.sort(rng.choice(n, size=min(n, config.max_robot_frames), replace=False)),
                   columns=["episode_id", "views"]).to_pylist()
    items = [{"episode_id": r["episode_id"], "jpeg": v["jpeg"]} for r in rows if r["episode_id"] in accepted
             for v in r["views"] or [] if v["ok"] and v["jpeg"]]
    rng.shuffle(items)
    items = items[: config.max_robot_frames]
    if not items:
        return {}, 0
    blocks = max(1, min(len(items) // 64 + 1, workers * 4))
    # no more tasks than blocks: Ray Data warns of a concurrency its input cannot fill
    frames = (ray.data.from_items(items, override_num_blocks=blocks)
              .map_batches(decode_jpegs, fn_kwargs={"resolution": resolution}, batch_size=64,
                           compute=ray.data.TaskPoolStrategy(min(workers, blocks))))
    out: dict[str, list] = {}
    failed = 0
    for batch in frames.iter_batches(batch_size=256, batch_format="numpy"):
        for episode_id, f, ok in zip(batch["episode_id"], batch["frames"], batch["ok"]):
            if ok:
                out.setdefault(str(episode_id), []).append(f)
            else:
                failed += 1
    return {k: np.stack(v) for k, v in out.items()}, failed


def sample_frames(lake: Lake, resolution: int, config: SampleConfig = SampleConfig(),
                  workers: int | None = None) -> FrameSample:
    """Training and held-out frames from `lake`'s accepted clips and robot steps."""
    import ray

    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    clips, failed = sample_clip_frames(lake, resolution, config, workers)
    robot, bad_jpegs = sample_robot_frames(lake, resolution, config, workers)
    train, held, counts = [], [], {"clip_decode_failures": failed, "robot_jpeg_failures": bad_jpegs}
    for kind, groups in (("clips", clips), ("episodes", robot)):
        held_units = _split(sorted(groups), config.held_out, config.seed)
        for unit in sorted(groups):
            (held if unit in held_units else train).append(groups[unit])
        counts[f"train_{kind}"] = len(groups) - len(held_units)
        counts[f"held_out_{kind}"] = len(held_units)
        counts[f"{kind}_frames"] = int(sum(len(g) for g in groups.values()))
    if not train:
        raise TokenizerTrainingError(
            f"lake {lake.root} has no frames to train a tokenizer on: it needs accepted clips "
            f"(gr2 build-videos) or accepted robot episodes (gr2 ingest-robot)"
            + (f"; {failed} clips could not be decoded" if failed else ""))
    train_frames = np.concatenate(train)
    held_frames = np.concatenate(held) if held else np.zeros((0, resolution, resolution, 3), np.uint8)
    if len(held_frames) > config.max_held_out_frames:
        pick = np.random.default_rng(config.seed).choice(len(held_frames), config.max_held_out_frames, replace=False)
        held_frames = held_frames[np.sort(pick)]
    counts.update(train_frames=len(train_frames), held_out_frames=len(held_frames))
    return FrameSample(train_frames, held_frames, counts)


# -- training -----------------------------------------------------------------------------------------


def train_tokenizer(lake: Lake, config, steps: int, train_config=None, workers: int = 1,
                    sample: SampleConfig = SampleConfig(), cpus_per_worker: float = 1.0,
                    log=print) -> TrainedTokenizer:
    """Sample frames from `lake`, train a tokenizer of `config` (a TokenizerConfig) for `steps`, save it
    under <lake>/models/tokenizers/<checkpoint id>/; with workers > 1 through Ray Train (torch DDP)."""
    from gr2.tokenizers import TokenizerTrainConfig

    train_config = train_config or TokenizerTrainConfig.for_steps(steps)
    if workers < 1:
        raise TokenizerTrainingError(f"workers must be at least 1, got {workers}")
    if workers > 1:
        check_cluster(workers, cpus_per_worker, error=TokenizerTrainingError)
    t0 = time.perf_counter()
    frames = sample_frames(lake, config.resolution, sample)
    log(f"tokenizer frames: {frames.counts}")
    run = f"tokenizer-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:6]}"
    args = {"config": config.to_dict(), "train_config": dataclasses.asdict(train_config), "steps": steps,
            "models": lake.models_dir("tokenizer"), "lake": lake.root, "counts": frames.counts, "workers": workers,
            "cpus_per_worker": cpus_per_worker, "run": run}
    if workers == 1:
        with progress(steps, "tokenizer", "step") as bar:
            def report_step(step: int, record: dict) -> None:
                bar.update(step - bar.done)
                if bar.bar is None:  # no terminal: the metrics go to the log instead
                    log(f"step {step}/{steps}: " + " ".join(f"{k}={v:.4g}" for k, v in record.items()
                                                             if k != "step" and isinstance(v, float)))

            report = _train_and_save(args, frames.train, frames.held_out, report_step)
    else:
        _fit(args, frames, workers, cpus_per_worker)
        report = _saved_by(lake, run)
    log(f"tokenizer {report['checkpoint_id']}: held-out {report['eval']}")
    return TrainedTokenizer(checkpoint_id=report["checkpoint_id"], checkpoint=report["checkpoint"],
                            eval=report["eval"], steps=report["steps"], seconds=time.perf_counter() - t0,
                            workers=workers, frames=frames.counts, final_loss=report["final_loss"])


def _train_and_save(args: dict, train_frames: np.ndarray, held_out: np.ndarray, callback=None) -> dict:
    """Train (under DDP when torch.distributed is up) and, on rank 0, save; returns what to report."""
    import torch.distributed as dist

    from gr2.tokenizers import TokenizerConfig, TokenizerTrainConfig, checkpoint_id, save_checkpoint, train

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    config = TokenizerConfig.from_dict(args["config"])
    train_config = TokenizerTrainConfig(**args["train_config"])
    # Each rank draws its batches from its own shard; held-out frames are sharded inside `evaluate`.
    tokenizer, metrics = train(train_frames[rank::world], config, args["steps"], train_config=train_config,
                               eval_frames=held_out if len(held_out) else None, callback=callback)
    cid = checkpoint_id(tokenizer)
    path = f"{args['models']}/{cid}"
    if rank == 0:
        info = {"trained_at": datetime.now(timezone.utc).isoformat(), "run": args["run"], "lake": args["lake"],
                "steps": metrics.steps,
                "workers": world, "frames_seen": metrics.frames_seen, "seconds": round(metrics.seconds, 1),
                "final_loss": metrics.final_loss, "held_out": metrics.eval, "frames": args["counts"],
                "train_config": args["train_config"]}
        save_checkpoint(tokenizer, path, info=info)
    return {"checkpoint_id": cid, "checkpoint": path, "eval": metrics.eval, "steps": metrics.steps,
            "final_loss": metrics.final_loss}


def _saved_by(lake: Lake, run: str) -> dict:
    """What rank 0 of training run `run` saved, read back from its checkpoint's info."""
    for entry in reversed(lake.checkpoints("tokenizer")):
        info = entry.info
        if info.get("run") == run:
            return {"checkpoint_id": entry.checkpoint_id, "checkpoint": entry.path, "eval": info["held_out"],
                    "steps": info["steps"], "final_loss": info["final_loss"]}
    raise TokenizerTrainingError(f"training run {run} finished without saving a checkpoint under {lake.models_dir('tokenizer')}")


def _worker(args: dict) -> None:
    """One Ray Train worker: its shard of the frames from the object store, DDP training; rank 0 saves."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(args["cpus_per_worker"])))
    train_frames, held_out = ray.get(args["frames"])
    _train_and_save(args, train_frames, held_out)


def _fit(args: dict, frames: FrameSample, workers: int, cpus_per_worker: float) -> None:
    import ray

    # The frames travel once through the object store; every worker reads them from there (they are
    # small next to the model's compute, and Ray Data's streaming split would want CPUs the workers hold).
    args = {**args, "frames": ray.put((frames.train, frames.held_out))}
    # Ray Train's own run records go beside the checkpoints, in a directory no checkpoint listing
    # reads (a leading dot); the checkpoint itself is saved by rank 0 (see _train_and_save).
    launch(_worker, args, workers=workers, cpus_per_worker=cpus_per_worker, use_gpu=False,
           storage=f"{args['models']}/.ray-train", name=args["run"])
