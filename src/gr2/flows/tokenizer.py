"""Tokenizer flows: `train_tokenizer` (frames from the lake -> a checkpoint under <lake>/models) and
`tokenize` (accepted clips -> token grids). Their commands are in tokenizer_cli.py."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gr2.flows.options import CommandError


class TrainTokenizerParams(BaseModel):
    """The training flow's parameters, validated before any work starts."""

    model_config = ConfigDict(extra="forbid")

    lake: str = Field(min_length=1)
    resolution: int = Field(64, ge=8, le=1024, description="frames are resized to this square side")
    codebook: int = Field(1024, ge=2, le=65536, description="codes (uint16 token ids)")
    downsample: int = Field(8, description="f: pixels per token side")
    steps: int = Field(1000, ge=1)
    workers: int = Field(1, ge=1, description=">1: torch DDP through Ray Train")
    batch_size: int = Field(32, ge=1, description="frames per step per worker")
    model: dict = Field(default_factory=dict, description="further TokenizerConfig settings, e.g. channels")
    frames_per_clip: int = Field(32, ge=1, description="frames spread over each sampled clip")
    max_frames: int = Field(20_000, ge=1, description="clip frames sampled at most")
    seed: int = 0

    @field_validator("model")
    @classmethod
    def _known_settings(cls, v: dict) -> dict:
        from dataclasses import fields

        from gr2.tokenizers import TokenizerConfig

        unknown = set(v) - {f.name for f in fields(TokenizerConfig)}
        if unknown:
            raise ValueError(f"unknown tokenizer settings {sorted(unknown)}")
        return v

    def tokenizer_config(self):
        from gr2.tokenizers import TokenizerConfig

        settings = {**self.model, "resolution": self.resolution, "codebook_size": self.codebook,
                    "downsample": self.downsample}
        try:
            return TokenizerConfig(**settings)
        except (TypeError, ValueError) as e:
            raise CommandError(f"tokenizer settings: {e}") from None


def training_markdown(result: dict) -> str:
    e, f = result["eval"], result["frames"]
    rows = [("checkpoint", f"`{result['checkpoint_id']}`"), ("path", result["checkpoint"]),
            ("held-out PSNR (dB)", f"{e.get('psnr_db', float('nan')):.2f}"),
            ("codebook usage", f"{e.get('codebook_usage', float('nan')):.1%}"),
            ("perplexity", f"{e.get('perplexity', float('nan')):.1f}"),
            ("encode-decode-encode agreement", f"{e.get('reencode_agreement', float('nan')):.1%}"),
            ("steps", result["steps"]), ("workers", result["workers"]), ("wall time (s)", f"{result['seconds']:.0f}")]
    rows += [(k.replace("_", " "), v) for k, v in f.items()]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"### Tokenizer `{result['checkpoint_id']}`\n\n| | |\n|---|---|\n{body}\n"


@flow(name="train-tokenizer", log_prints=True)
def train_tokenizer(lake: str, resolution: int = 64, codebook: int = 1024, steps: int = 1000, workers: int = 1,
                    downsample: int = 8, batch_size: int = 32, model: dict | None = None, frames_per_clip: int = 32,
                    max_frames: int = 20_000, seed: int = 0) -> dict:
    """Train a VQ tokenizer on frames of `lake` and save it under <lake>/models/tokenizers/."""
    from gr2.flows.runtime import ensure_ray
    from gr2.lake.lake import Lake
    from gr2.tokenizers import TokenizerTrainConfig
    from gr2.training.tokenizer import SampleConfig, TokenizerTrainingError
    from gr2.training.tokenizer import train_tokenizer as run_training

    p = TrainTokenizerParams(lake=lake, resolution=resolution, codebook=codebook, steps=steps, workers=workers,
                             downsample=downsample, batch_size=batch_size, model=model or {},
                             frames_per_clip=frames_per_clip, max_frames=max_frames, seed=seed)
    config = p.tokenizer_config()
    the_lake = Lake(p.lake)
    if not the_lake.exists():
        raise CommandError(f"no lake at {the_lake.root}")
    logger = get_run_logger()
    ensure_ray()
    # A short run still gets its warm-up, re-encode term and consistency phase, scaled to its steps.
    train_config = TokenizerTrainConfig.for_steps(p.steps, batch_size=p.batch_size, seed=p.seed)
    sample = SampleConfig(frames_per_clip=p.frames_per_clip, max_clip_frames=p.max_frames, seed=p.seed)
    try:
        result = run_training(the_lake, config, p.steps, train_config, workers=p.workers, sample=sample,
                              log=logger.info).to_dict()
    except TokenizerTrainingError as e:  # a lake with nothing to train on, more workers than CPUs
        raise CommandError(str(e)) from None
    create_markdown_artifact(key="tokenizer-training", markdown=training_markdown(result),
                             description=f"tokenizer {result['checkpoint_id']}")
    return {k: result[k] for k in ("checkpoint_id", "checkpoint", "eval", "steps", "workers", "seconds", "frames")}


def tokenize_markdown(result: dict) -> str:
    rows = [("tokenizer", f"`{result['tokenizer_id']}`"), ("accepted clips", result["accepted"]),
            ("tokenized now", result["tokenized"]), ("already tokenized (left alone)", result["already"]),
            ("failed to decode", result["failed"]), ("wall time (s)", f"{result['seconds']:.1f}")]
    rows += [(f"robot episodes: {k}", result[f"episodes{suffix}"])
             for k, suffix in (("accepted", ""), ("tokenized now", "_tokenized"), ("already tokenized", "_already"),
                               ("failed", "_failed")) if f"episodes{suffix}" in result]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    failures = "".join(f"- {r}\n" for r in result.get("failures", []))
    return f"### Tokenize\n\n| clips | count |\n|---|---|\n{body}\n" + (f"\n**Failed**\n\n{failures}" if failures else "")


@flow(name="tokenize-lake", log_prints=True)
def tokenize(lake: str, tokenizer: str | None = None) -> dict:
    """Give the accepted clips and robot steps of `lake` tokens of `tokenizer` (an id; default: the
    lake's current one), re-tokenizing rows of any other tokenizer and leaving the rest alone."""
    from gr2.flows.runtime import ensure_ray
    from gr2.lake.lake import Lake
    from gr2.robot.tokens import tokenize_steps
    from gr2.video.tokenize import current_tokenizer, tokenize_lake

    the_lake = Lake(lake)
    if not the_lake.exists("clips") and not the_lake.exists("episodes"):
        raise CommandError(f"no clips or robot episodes in a lake at {the_lake.root}")
    path = current_tokenizer(the_lake, tokenizer)
    if path is None:
        raise CommandError(f"lake {the_lake.root} has no tokenizer yet: run gr2 train-tokenizer --lake {lake}")
    logger = get_run_logger()
    ensure_ray()
    result = tokenize_lake(the_lake, path, only_missing=True, log=logger.info).to_dict()
    steps = tokenize_steps(the_lake, path, only_missing=True, log=logger.info)
    result.update(episodes=steps.episodes, episodes_tokenized=steps.tokenized, episodes_already=steps.already,
                  episodes_failed=steps.failed)
    create_markdown_artifact(key="tokenize-lake", markdown=tokenize_markdown(result),
                             description=f"tokens of {result['tokenizer_id']}")
    return {k: result[k] for k in ("tokenizer_id", "accepted", "tokenized", "already", "failed", "seconds",
                                   "episodes", "episodes_tokenized", "episodes_already", "episodes_failed")}
