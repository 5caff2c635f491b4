"""A plain torch training loop for the tokenizer; runs alone or inside a torch DDP worker."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .losses import (
    PatchDiscriminator,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    psnr,
    reconstruction_loss,
)
from .model import Tokenizer, TokenizerConfig, TokenizerOutput, to_model_input
from .quantize import codebook_stats

Frames = np.ndarray | torch.Tensor  # uint8 [N, 3, H, W] or [N, H, W, 3]


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """How to train; unlike TokenizerConfig, none of this shapes the weights' layout."""

    batch_size: int = 32  # per rank
    lr: float = 1e-3
    warmup_steps: int = 100  # linear lr warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    reencode_weight: float = 1.0  # pulls encode(decode(tokens)) back onto the same tokens
    # ... from this step on, its weight ramped up linearly over `reencode_ramp` steps: switched on
    # early or at once, it collapses the codebook or knocks Adam off course (-2 dB in one step).
    reencode_start: int = 200
    reencode_ramp: int = 100
    # The consistency phase, from this step on (None: never). The codebook freezes, and a frozen
    # copy of the tokenizer gives each frame its target tokens. The encoder learns to keep real
    # frames on them and to read decoded images back onto them; the decoder learns to draw
    # tokens so they are read back. Until then the encoder moves and the decoder chases it.
    consistency_at: int | None = None
    consistency_weight: float = 0.5  # the re-encode loss's weight in the consistency phase
    keep_weight: float = 0.1  # real frames' features held to their target tokens
    # Cross-entropy over codes at this temperature (cosine logits) for both, in that phase: it
    # pushes each token to win by a margin, which a distance does not, and with the codebook
    # and targets fixed it cannot buy that margin by using fewer codes. None: the distance.
    reencode_temperature: float | None = 0.02
    # In that phase, token grids the data never produced, decoded beside each batch and held to
    # the re-encode loss: `reencode_extra` x batch_size grids, each another frame's grid with
    # `reencode_swap` of its tokens replaced by tokens drawn from the batch. Without them the
    # decoder learns to agree on the training frames' layouts only (98% there, 84% held out).
    reencode_extra: float = 0.5
    reencode_swap: float = 0.5
    disc_start: int | None = None  # step at which the patch discriminator switches on; None: off
    disc_weight: float = 0.1
    disc_lr: float = 2e-4
    hflip: bool = True  # random horizontal flips of training frames
    eval_every: int = 0  # 0: evaluate only after the last step
    eval_batch_size: int = 64
    log_every: int = 25
    seed: int = 0

    @classmethod
    def for_steps(cls, steps: int, **changes: Any) -> "TokenizerTrainConfig":
        """The schedule fitted to a run of `steps`: lr warm-up over the first 10% (at most 100
        steps), the re-encode loss from 20% (at most 200), the consistency phase for the last 30%.
        `changes` override any field."""
        schedule = {"warmup_steps": min(100, max(1, steps // 10)), "reencode_start": min(200, steps // 5),
                    "consistency_at": max(1, round(0.7 * steps))}
        return cls(**{**schedule, **changes})


@dataclass
class TrainMetrics:
    steps: int
    seconds: float
    frames_seen: int  # summed over ranks
    final_loss: float
    eval: dict[str, float]  # held-out: psnr_db, codebook_usage, perplexity, reencode_agreement
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def as_nchw(frames: Frames) -> torch.Tensor:
    """uint8 frames [N, 3, H, W] or [N, H, W, 3] (decord's layout) -> tensor [N, 3, H, W]."""
    x = torch.as_tensor(frames)
    if x.ndim != 4:
        raise ValueError(f"frames must be 4-d [N, 3, H, W] or [N, H, W, 3], got {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"frames need 3 colour channels, got shape {tuple(x.shape)}")
    return x


def _batches(frames: Frames | Iterable, batch_size: int, seed: int, key: str) -> Iterator[torch.Tensor]:
    """Endless random batches from an array, or the batches an iterable yields."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        data = as_nchw(frames)
        rank, _ = _rank_world()
        gen = torch.Generator().manual_seed(seed + 1000 * rank)  # ranks draw different batches
        while True:
            yield data[torch.randint(0, len(data), (batch_size,), generator=gen)]
    while True:
        empty = True
        for batch in frames:
            empty = False
            yield as_nchw(batch[key] if isinstance(batch, Mapping) else batch)
        if empty or iter(frames) is frames:  # an exhausted iterator cannot start again
            return


@torch.no_grad()
def evaluate(tokenizer: Tokenizer, frames: Frames, batch_size: int = 64) -> dict[str, float]:
    """Held-out PSNR (dB), codebook usage and perplexity, and encode->decode->encode agreement.

    Under torch.distributed each rank takes a shard of `frames` and the totals are summed.
    """
    rank, world = _rank_world()
    data = as_nchw(frames)[rank::world]
    device = tokenizer.device
    psnr_sum = torch.zeros((), dtype=torch.float64, device=device)
    agree = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(tokenizer.num_codes, dtype=torch.float64, device=device)
    n_images = torch.tensor(float(len(data)), dtype=torch.float64, device=device)
    for start in range(0, len(data), batch_size):
        x = data[start : start + batch_size]
        tokens = tokenizer.encode(x)
        recon = tokenizer.decode(tokens)
        psnr_sum += psnr((to_model_input(x, device) + 1) / 2, recon).sum()
        agree += (tokenizer.encode(recon) == tokens).double().mean(dim=(1, 2)).sum()
        counts += torch.bincount(tokens.flatten(), minlength=tokenizer.num_codes).double()
    if world > 1:
        for t in (psnr_sum, agree, counts, n_images):
            dist.all_reduce(t)
    n = max(float(n_images), 1.0)
    return {"psnr_db": float(psnr_sum) / n, "reencode_agreement": float(agree) / n, **codebook_stats(counts)}


def perturbed_grids(grids: torch.Tensor, fraction: float, swap: float, gen: torch.Generator) -> torch.Tensor:
    """round(fraction * B) grids [E, h, w], each a random grid of `grids` [B, h, w] with `swap` of
    its positions re-drawn from the tokens anywhere in `grids`: layouts no frame produced, made of
    tokens real frames use."""
    b = grids.shape[0]
    n = max(1, round(fraction * b))
    pick = torch.randint(0, b, (n,), generator=gen).to(grids.device)
    out = grids[pick].clone()
    mask = (torch.rand(out.shape, generator=gen) < swap).to(grids.device)
    pool = grids.flatten()
    draw = torch.randint(0, pool.numel(), (int(mask.sum()),), generator=gen).to(grids.device)
    out[mask] = pool[draw]
    return out


def _lr_lambda(cfg: TokenizerTrainConfig, steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Phase(NamedTuple):
    """What one step trains toward: the loss weights, and in the consistency phase its targets."""

    reencode_weight: float
    keep_weight: float  # of the quantizer loss: real frames' features held to their tokens
    targets: torch.Tensor | None = None  # the frozen teacher's tokens for the batch
    extra: torch.Tensor | None = None  # token grids no frame produced, decoded beside the batch
    temperature: float | None = None  # of the re-encode cross-entropy; None: a distance


def phase_at(step: int, cfg: TokenizerTrainConfig, x: torch.Tensor, teacher: Tokenizer | None,
             last_grids: torch.Tensor | None, gen: torch.Generator) -> Phase:
    """Before the consistency phase, the re-encode loss ramped in from `reencode_start`; in it, the
    teacher's tokens as targets and perturbed grids built from the previous batch's."""
    if teacher is None:
        ramp = max(0, step - cfg.reencode_start + 1) / max(cfg.reencode_ramp, 1)
        return Phase(cfg.reencode_weight * min(1.0, ramp), 1.0)
    targets = teacher.tokens(x)
    extra = None
    if cfg.reencode_extra > 0 and last_grids is not None:
        # Built from the previous batch's grids: real layouts, no extra encoder pass.
        extra = perturbed_grids(last_grids, cfg.reencode_extra, cfg.reencode_swap, gen)
    return Phase(cfg.consistency_weight, cfg.keep_weight, targets, extra, cfg.reencode_temperature)


def freeze_teacher(tokenizer: Tokenizer) -> Tokenizer:
    """Start the consistency phase: a frozen copy gives targets, and the codebook stops moving."""
    teacher = copy.deepcopy(tokenizer).eval().requires_grad_(False)
    tokenizer.quantizer.eval()  # no more EMA updates or restarts: the codebook is fixed
    return teacher


class Adversary:
    """The patch discriminator from `disc_start` on: the generator's extra loss, and its own step."""

    def __init__(self, cfg: TokenizerTrainConfig, device: torch.device, world: int):
        self.start, self.weight = cfg.disc_start, cfg.disc_weight
        self.disc = PatchDiscriminator().to(device).train()
        self.net = DistributedDataParallel(self.disc, device_ids=[device.index] if device.type == "cuda" else None) \
            if world > 1 else self.disc
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))

    def generator_loss(self, reconstruction: torch.Tensor) -> torch.Tensor:
        self.disc.requires_grad_(False)  # the generator's step must not touch the discriminator
        loss = self.weight * generator_adversarial_loss(self.disc(reconstruction))
        self.disc.requires_grad_(True)
        return loss

    def step(self, x: torch.Tensor, reconstruction: torch.Tensor) -> float:
        """One discriminator update on real `x` against `reconstruction`; returns its loss."""
        # Real and fake in one forward: DDP allows a module one forward per backward.
        logits = self.net(torch.cat([x, reconstruction.detach()]))
        loss = discriminator_hinge_loss(*logits.chunk(2))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


class _Run:
    """A training run's moving parts: the model (DDP-wrapped on several ranks), its optimiser and
    schedule, the discriminator, and the consistency phase's teacher once it starts."""

    def __init__(self, tokenizer: Tokenizer, cfg: TokenizerTrainConfig, steps: int, device: torch.device, world: int):
        self.tokenizer, self.cfg, self.net = tokenizer, cfg, tokenizer
        if world > 1:
            # Buffers (the EMA codebook) stay in sync by the quantizer's own all-reduce; no need for
            # DDP to broadcast them every step.
            self.net = DistributedDataParallel(
                tokenizer, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self.opt = torch.optim.Adam(tokenizer.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg, steps))
        self.adversary = Adversary(cfg, device, world) if cfg.disc_start is not None else None
        self.teacher: Tokenizer | None = None
        self.last_grids: torch.Tensor | None = None

    def step(self, x: torch.Tensor, step: int, gen: torch.Generator) -> tuple[TokenizerOutput, dict[str, float]]:
        """One optimiser step (and discriminator step) on batch `x`; the output and its record."""
        cfg = self.cfg
        if self.teacher is None and cfg.consistency_at is not None and step >= cfg.consistency_at:
            self.teacher = freeze_teacher(self.tokenizer)
        phase = phase_at(step, cfg, x, self.teacher, self.last_grids, gen)
        out = self.net(x, reencode=phase.reencode_weight > 0, extra_grids=phase.extra, targets=phase.targets,
                       reencode_temperature=phase.temperature)
        self.last_grids = out.indices.detach()
        rec = reconstruction_loss(x, out.reconstruction, cfg.l1_weight, cfg.l2_weight)
        loss = rec + phase.keep_weight * out.quantizer_loss + phase.reencode_weight * out.reencode_loss
        adversarial = self.adversary is not None and step >= self.adversary.start
        if adversarial:
            loss = loss + self.adversary.generator_loss(out.reconstruction)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.tokenizer.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        record = {"step": step, "loss": loss.item(), "recon": rec.item(), "quant": out.quantizer_loss.item(),
                  "reencode": out.reencode_loss.item(), "lr": self.sched.get_last_lr()[0]}
        if adversarial:
            record["disc"] = self.adversary.step(x, out.reconstruction)
        return out, record


def _training_input(batch: torch.Tensor, config: TokenizerConfig, device: torch.device, hflip: bool,
                    gen: torch.Generator) -> torch.Tensor:
    """A batch of frames as the model takes them, at random flipped left-right when `hflip`."""
    if batch.shape[-1] != config.resolution or batch.shape[-2] != config.resolution:
        raise ValueError(f"frames are {tuple(batch.shape[-2:])}, the config trains at {config.resolution}")
    x = to_model_input(batch, device)
    if hflip:
        flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def _batch_stats(out: TokenizerOutput, tokenizer: Tokenizer) -> dict[str, float]:
    """The batch's codebook usage and the quantizer's restarts so far, for the log."""
    counts = torch.bincount(out.indices.flatten(), minlength=tokenizer.num_codes)
    return {**{f"batch_{k}": v for k, v in codebook_stats(counts).items()},
            "restarts": getattr(tokenizer.quantizer, "restarts", 0)}


def train(
    frames: Frames | Iterable,
    config: TokenizerConfig = TokenizerConfig(),
    steps: int = 1000,
    *,
    train_config: TokenizerTrainConfig = TokenizerTrainConfig(),
    eval_frames: Frames | None = None,
    model: Tokenizer | None = None,
    device: str | torch.device | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
    frames_key: str = "frames",
) -> tuple[Tokenizer, TrainMetrics]:
    """Train a tokenizer for `steps` optimizer steps; returns it (unwrapped) and its metrics.

    frames: uint8 [N, 3, H, W] / [N, H, W, 3] sampled at random, or an iterable of such batches
        (or of dicts holding them under `frames_key`, as Ray Train's iterators yield).
    eval_frames: held-out frames for PSNR and codebook usage; none: no evaluation.
    When torch.distributed is initialised, the model is wrapped in DDP and EMA codebook
    statistics are summed over ranks; each rank should be given its own shard of frames.
    callback(step, metrics) is called every `log_every` steps and after each evaluation.
    """
    cfg = train_config
    rank, world = _rank_world()
    device = torch.device(device) if device is not None else _default_device()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts anyway)
    tokenizer = (model or Tokenizer(config)).to(device).train()
    run = _Run(tokenizer, cfg, steps, device, world)
    bar = _progress_bar(steps) if progress and rank == 0 else None
    history: list[dict[str, float]] = []
    eval_metrics: dict[str, float] = {}
    batches = _batches(frames, cfg.batch_size, cfg.seed, frames_key)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 7919 * rank)
    t0, seen, loss_value, step = time.perf_counter(), 0, float("nan"), 0
    for step in range(1, steps + 1):
        try:
            batch = next(batches)
        except StopIteration:
            step -= 1
            break
        x = _training_input(batch, tokenizer.config, device, cfg.hflip, gen)
        seen += x.shape[0]
        out, record = run.step(x, step, gen)
        loss_value = record["loss"]
        if step % cfg.log_every == 0 or step == steps:
            record.update(_batch_stats(out, tokenizer), seconds=time.perf_counter() - t0)
            _report(history, callback, step, record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", usage=f"{record['batch_codebook_usage']:.2f}")
        if eval_frames is not None and (step == steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            eval_metrics = evaluate(tokenizer, eval_frames, cfg.eval_batch_size)
            _report(history, callback, step, {"step": step, **{f"eval_{k}": v for k, v in eval_metrics.items()}})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if eval_frames is not None and not eval_metrics:  # the data ran out before `steps`
        eval_metrics = evaluate(tokenizer, eval_frames, cfg.eval_batch_size)
    return tokenizer.eval(), TrainMetrics(steps=step, seconds=time.perf_counter() - t0, frames_seen=seen * world,
                                          final_loss=loss_value, eval=eval_metrics, history=history)


def _report(history: list[dict[str, float]], callback, step: int, record: dict[str, float]) -> None:
    history.append(record)
    if callback:
        callback(step, record)


def _progress_bar(steps: int):
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="tokenizer", unit="step")
