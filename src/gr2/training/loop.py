"""The training loop: Ray Train's TorchTrainer over N workers (CPU or GPU, DDP), resumable.

`train(lake, config)` runs on the driver. Before any worker starts it checks what can be checked
(workers vs the cluster, the lake's tokens, the init checkpoint's tokenizer) and resolves the data
(data.plan_data) and the model config. Each worker then reads its own shard straight from the
lake, trains, and rank 0 writes per-step metrics and, every `checkpoint_every` steps, a checkpoint
under <lake>/models/gr2/<run_id>/.

A run's id hashes what shapes its result (stage, model, data, optimisation, init, the tokenizer
and the table version it reads), not its step count or worker count. So running the same command
again after a kill resumes from the run's last checkpoint, and so does Ray Train when it restarts
a worker group after a worker died (FailureConfig): every worker looks for it when it starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from gr2.errors import Gr2Error
from gr2.lake.lake import Lake
from gr2.lake.provenance import settings_hash
from gr2.lake.uri import is_remote
from gr2.robot import layout as lay
from gr2.training import checkpoint as ckpt
from gr2.training.data import DataConfig, DataSpec, TrainingDataError, iter_batches, plan_data
from gr2.training.launcher import check_cluster, launch
from gr2.training.metrics import METRICS, MetricsLog, Throughput, follow, read_metrics, read_metrics_raw
from gr2.training.model import GR2, GR2Config
from gr2.training.text import text_encoder_for


class TrainingConfigError(Gr2Error):
    """A training request that cannot run as asked (workers, batch size, model overrides)."""


class TrainConfig(BaseModel):
    """How to train; defaults run a short tiny pre-training on CPU."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    stage: Literal["pretrain", "finetune"] = "pretrain"
    size: str = "tiny"  # GR2Config.named: tiny | S | B
    model: dict[str, Any] = {}  # GR2Config overrides, e.g. {"n_views": 1, "history": 2}
    data: DataConfig = DataConfig()
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)  # global: split over the workers
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * this at `steps`
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    report_every: int = Field(10, ge=1)  # how often workers report to Ray Train (the JSONL gets every step)
    max_failures: int = Field(1, ge=0)  # worker-group restarts, each resuming from the last checkpoint
    max_minutes: float | None = None  # wall-clock budget of one attempt: checkpoint and stop when spent
    # the same in CPU time of rank 0's process (all its threads): a budget that means the same on a
    # machine shared with other work, where wall time does not
    max_cpu_minutes: float | None = None
    init: str | None = None  # checkpoint (id or directory) to start from: fine-tuning from pre-training
    tokenizer: str | None = None  # tokenizer checkpoint directory, when not under <lake>/models

    def shaping(self) -> dict:
        """The settings that change what a run computes (not how long, nor on how many workers)."""
        skip = {"steps", "workers", "cpus_per_worker", "use_gpu", "checkpoint_every", "keep_checkpoints",
                "report_every", "max_failures", "max_minutes", "max_cpu_minutes", "tokenizer"}
        shaping = {k: v for k, v in self.model_dump().items() if k not in skip}
        if shaping["data"]["frame_stride"] == 1:  # the default: runs from before the setting keep their ids
            del shaping["data"]["frame_stride"]
        return shaping


@dataclass
class TrainResult:
    run_id: str
    run_dir: str
    checkpoint_id: str
    checkpoint: str  # directory of the last checkpoint
    stage: str
    steps: int
    resumed_from: int  # step the last attempt started from (0: from scratch)
    metrics: dict  # the last step's record
    unigram_entropy_nats: float | None
    seconds: float
    workers: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- the driver -----------------------------------------------------------------------------------


def check_resources(config: TrainConfig) -> None:
    """Refuse more workers than the Ray cluster has room for, or a batch they cannot split, before
    anything waits on them."""
    check_cluster(config.workers, config.cpus_per_worker, config.use_gpu, TrainingConfigError)
    if config.batch_size % config.workers:
        raise TrainingConfigError(f"batch size {config.batch_size} does not split evenly over {config.workers} workers")


def model_config_for(config: TrainConfig, spec: DataSpec) -> GR2Config:
    """The size's config with the overrides, and what the data dictates (codebook, grid, views, dims)."""
    try:
        base = GR2Config.named(config.size, **config.model)
    except (TypeError, ValueError) as e:
        raise TrainingConfigError(f"model config: {e}") from None
    # text_dim is the lake's text embeddings' width: batches carry those vectors, never strings
    derived: dict[str, Any] = {"codebook_size": spec.codebook_size, "grid_h": spec.grid[0], "grid_w": spec.grid[1],
                               "text_dim": spec.text["dim"]}
    if spec.stage == "finetune":
        derived.update(n_views=len(spec.cameras), state_dim=spec.state_dim, action_dim=spec.action_dim,
                       action_binary=lay.binary_dims(lay.from_rows(spec.action_layout)),
                       state_gripper=lay.gripper_dims(lay.from_rows(spec.state_layout)))
    clash = {k: (config.model[k], v) for k, v in derived.items() if k in config.model and config.model[k] != v}
    if clash:
        raise TrainingConfigError("model settings contradict the lake: " + ", ".join(
            f"{k}={mine} but the data has {k}={theirs}" for k, (mine, theirs) in clash.items()))
    return dataclasses.replace(base, **derived)


def check_init(init_dir: str, spec: DataSpec, model_config: GR2Config) -> dict:
    """The init checkpoint's facts, if it can start this run: same tokenizer, same text model, fitting weights."""
    meta = ckpt.read_meta(init_dir)
    ckpt.check_text_model(meta, spec.text, spec.lake)
    if meta.get("tokenizer_id") != spec.tokenizer_id:
        raise ckpt.CheckpointError(
            f"checkpoint {meta['checkpoint_id']} was trained on tokens of tokenizer {meta.get('tokenizer_id')} "
            f"(codebook {meta['model']['codebook_size']}), but this lake's tokens come from tokenizer "
            f"{spec.tokenizer_id} (codebook {spec.codebook_size}): a token id means something else to it")
    ckpt.init_from(GR2(model_config), init_dir)  # raises on weights that do not fit, naming them
    return meta


def run_id_for(config: TrainConfig, spec: DataSpec, init_id: str | None) -> str:
    facts = {"config": config.shaping(), "init": init_id, "tokenizer": spec.tokenizer_id,
             "table_version": spec.table_version, "lake": spec.lake}
    digest = settings_hash(facts)[:10]
    return f"{config.stage}-{config.size}-{digest}"


def plan(lake: Lake | str, config: TrainConfig) -> dict:
    """Everything a run needs, checked: raises before training on anything that would stop it."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    check_resources(config)
    try:
        probe = GR2Config.named(config.size, **config.model)
    except (TypeError, ValueError) as e:
        raise TrainingConfigError(f"model config: {e}") from None
    spec = plan_data(lake, config.stage, probe.history, probe.chunk, config.data, config.tokenizer)
    model_config = model_config_for(config, spec)
    init_dir = init_meta = None
    if config.init:
        init_dir = ckpt.resolve_checkpoint(lake.root, config.init)
        init_meta = check_init(init_dir, spec, model_config)
    run_id = run_id_for(config, spec, init_meta["checkpoint_id"] if init_meta else None)
    return {"lake": lake.root, "config": config, "spec": spec, "model": model_config, "init": init_dir,
            "init_id": init_meta["checkpoint_id"] if init_meta else None, "run_id": run_id,
            "run_dir": f"{lake.models_dir('gr2')}/{run_id}"}


def train(lake: Lake | str, config: TrainConfig = TrainConfig(),
          progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) the run `config` describes on `lake`; returns its last checkpoint.

    progress: called with each metrics record as rank 0 writes it (local lakes), from a thread."""
    p = plan(lake, config)
    run_dir = p["run_dir"]
    _write_run(p)
    started = time.perf_counter()
    last = ckpt.latest_checkpoint(run_dir)
    stop, follower = threading.Event(), None
    if progress is not None and not is_remote(run_dir):
        follower = follow(os.path.join(run_dir, METRICS), progress, stop, start_at_end=True)
    try:
        _fit(p, config, last)
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=10)
    return result_of(run_dir, time.perf_counter() - started, config.workers)


def _fit(p: dict, config: TrainConfig, last: str | None) -> None:
    run_dir = p["run_dir"]
    if last is None or ckpt.read_meta(last)["step"] < config.steps:
        args = {"config": config.model_dump(), "spec": p["spec"].to_dict(), "model": dataclasses.asdict(p["model"]),
                "init": p["init"], "run_id": p["run_id"], "run_dir": run_dir}
        launch(_worker, args, workers=config.workers, cpus_per_worker=config.cpus_per_worker, use_gpu=config.use_gpu,
               storage=f"{run_dir}/ray", name=p["run_id"], max_failures=config.max_failures)


def result_of(run_dir: str, seconds: float = 0.0, workers: int = 0) -> TrainResult:
    last = ckpt.latest_checkpoint(run_dir)
    if last is None:
        raise ckpt.CheckpointError(f"run {run_dir} finished without a checkpoint")
    meta = ckpt.read_meta(last)
    records = read_metrics(run_dir)
    starts = [r for r in read_metrics_raw(f"{run_dir}/metrics.jsonl") if r.get("event") == "start"]
    return TrainResult(run_id=meta["run_id"], run_dir=run_dir, checkpoint_id=meta["checkpoint_id"], checkpoint=last,
                       stage=meta["stage"], steps=meta["step"], resumed_from=starts[-1]["from_step"] if starts else 0,
                       metrics=records[-1] if records else {}, unigram_entropy_nats=meta.get("unigram_entropy_nats"),
                       seconds=seconds, workers=workers)


def _write_run(p: dict) -> None:
    from gr2.lake.uri import url_to_fs

    fs, root = url_to_fs(p["run_dir"])
    fs.makedirs(root, exist_ok=True)
    spec: DataSpec = p["spec"]
    facts = {"run_id": p["run_id"], "lake": p["lake"], "config": p["config"].model_dump(),
             "model": dataclasses.asdict(p["model"]), "init": p["init"], "init_id": p["init_id"],
             "tokenizer_id": spec.tokenizer_id, "table_version": spec.table_version,
             "train_items": len(spec.train_ids), "heldout_items": len(spec.heldout_ids),
             "unigram_entropy_nats": spec.unigram_entropy_nats}
    with fs.open(f"{root}/run.json", "w") as f:
        json.dump(facts, f, indent=1, default=str)


# -- the workers ----------------------------------------------------------------------------------


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step <= config.warmup_steps:
        return config.lr * step / max(config.warmup_steps, 1)
    progress = min(1.0, (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: GR2, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, decaying matrices only (nanoGPT): no decay on biases, norms and embeddings' offsets."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _worker(args: dict) -> None:
    """One Ray Train worker: resume or init, then train to `steps`, rank 0 logging and checkpointing."""
    import ray.train
    import ray.train.torch

    config = TrainConfig(**args["config"])
    spec = DataSpec.from_dict(args["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    torch.manual_seed(config.seed)
    resume = ckpt.latest_checkpoint(args["run_dir"])  # also after Ray restarted this worker group
    model, optimizer, start = _model_and_optimizer(args, config, resume, device)
    # pre-training leaves the state and action layers out of the graph; DDP must be told
    net = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": spec.stage == "pretrain"})

    per_rank = config.batch_size // world
    # a resumed run draws a fresh order rather than replaying the first steps' batches
    batches = iter_batches(spec, per_rank, rank, world, seed=config.seed + 7919 * start)
    log = _start_log(args["run_dir"], start, resume, world) if rank == 0 else None
    meter = Throughput()
    started, cpu_started = time.monotonic(), time.process_time()
    tokens_per_sample = None
    for step in range(start + 1, config.steps + 1):
        lr = lr_at(step, config)
        batch = to_device(next(batches), device)
        if tokens_per_sample is None:
            tokens_per_sample = int(batch["frames"][0].numel())
        out, grad_norm = _optimizer_step(net, model, optimizer, batch, lr, config.grad_clip, device)
        record = {"step": step, "lr": lr, **_mean_over_ranks(out, world),
                  **meter.tick(per_rank * world, per_rank * world * tokens_per_sample),
                  "elapsed_s": time.monotonic() - started, "cpu_s": time.process_time() - cpu_started}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if log:
            log.write(record)
        out_of_time = _out_of_time(config, record, world)
        last = step == config.steps or out_of_time
        if log and (step % config.checkpoint_every == 0 or last):
            log.flush()
            _save(model, optimizer, args, spec, config, step, record)
        if step % config.report_every == 0 or last:
            if log:
                log.flush()
            ray.train.report(record)  # a barrier: every rank reports at the same steps
        if last:
            break


def _model_and_optimizer(args: dict, config: TrainConfig, resume: str | None,
                         device: torch.device) -> tuple[GR2, torch.optim.Optimizer, int]:
    """The model and optimizer this attempt starts from, and their step: the run's last checkpoint,
    else a new model (from the `init` checkpoint's weights, when given)."""
    start, optimizer_state = 0, None
    if resume:
        loaded = ckpt.load_checkpoint(resume, with_optimizer=True)
        model, optimizer_state, start = loaded.model, loaded.optimizer_state, loaded.meta["step"]
    else:
        model_config = GR2Config(**args["model"])
        model = GR2(model_config, text_encoder_for(model_config))
        if args["init"]:
            ckpt.init_from(model, args["init"])
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return model, optimizer, start


def _start_log(run_dir: str, start: int, resume: str | None, world: int) -> MetricsLog:
    """Rank 0's metrics log, opened with a record of where this attempt starts."""
    log = MetricsLog(run_dir)
    log.write({"event": "start", "from_step": start, "checkpoint": resume, "world": world, "pid": os.getpid(),
               "time": time.time()})
    log.flush()
    return log


def _optimizer_step(net: torch.nn.Module, model: GR2, optimizer: torch.optim.Optimizer, batch: dict, lr: float,
                    grad_clip: float, device: torch.device) -> tuple[dict, torch.Tensor | None]:
    """Forward, backward and one step at `lr`; the model's outputs and the gradient norm (None: no clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = net(batch)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
    optimizer.step()
    return out, grad_norm


def _mean_over_ranks(out: dict, world: int) -> dict[str, float]:
    """The outputs as the global batch's numbers, however many workers."""
    import torch.distributed as dist

    keys = sorted(out)
    values = torch.stack([out[k].detach().float() for k in keys])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return {k: float(v) for k, v in zip(keys, values)}


def _out_of_time(config: TrainConfig, record: dict, world: int) -> bool:
    """Whether this attempt's wall-clock or CPU budget is spent."""
    import torch.distributed as dist

    spent = torch.tensor(float(
        (config.max_minutes is not None and record["elapsed_s"] > 60 * config.max_minutes)
        or (config.max_cpu_minutes is not None and record["cpu_s"] > 60 * config.max_cpu_minutes)))
    if world > 1:
        dist.broadcast(spent, 0)  # rank 0's clock decides, so every rank stops at one step
    return bool(spent)


def _save(model: GR2, optimizer: torch.optim.Optimizer, args: dict, spec: DataSpec, config: TrainConfig, step: int,
          record: dict) -> None:
    """Rank 0's checkpoint at `step`; all but the newest `keep_checkpoints` are then pruned."""
    directory = f"{args['run_dir']}/step-{step:06d}"
    ckpt.save_checkpoint(model, directory, optimizer, checkpoint_meta(args, spec, config, step, record))
    ckpt.prune(args["run_dir"], config.keep_checkpoints)


def checkpoint_meta(args: dict, spec: DataSpec, config: TrainConfig, step: int, record: dict) -> dict:
    """What a checkpoint records beside its weights: enough to evaluate and act without the run."""
    return {
        "run_id": args["run_id"], "stage": spec.stage, "step": step, "lake": spec.lake,
        "tokenizer_id": spec.tokenizer_id, "tokenizer_path": spec.tokenizer_path, "codebook_size": spec.codebook_size,
        "table_version": spec.table_version, "init": args["init"],
        "data": {"history": spec.history, "chunk": spec.chunk, "frame_stride": spec.config.frame_stride,
                 "cameras": list(spec.cameras),
                 "state_dims": list(spec.config.state_dims) if spec.config.state_dims is not None else None,
                 "action_column": spec.config.action_column, "grid": list(spec.grid),
                 "state_layout": spec.state_layout, "action_layout": spec.action_layout},
        "stats": spec.stats, "unigram_entropy_nats": spec.unigram_entropy_nats,
        "text": spec.text,  # the text model whose stored embeddings the model was trained on
        "train_config": config.model_dump(), "metrics": record,
    }


__all__ = ["TrainConfig", "TrainResult", "TrainingConfigError", "TrainingDataError", "check_resources", "plan",
           "train", "result_of", "lr_at", "make_optimizer", "model_config_for"]
