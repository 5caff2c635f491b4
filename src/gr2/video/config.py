"""The video build's configuration: one frozen model, hashed into every row it shaped."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from gr2.lake.provenance import settings_hash


class BuildConfig(BaseModel):
    """How the video build cuts, samples and gates clips. The defaults run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Clips
    clip_s: float = Field(2.0, gt=0, description="length of a candidate clip, seconds")
    frames_per_clip: int = Field(8, ge=2, le=64, description="frames sampled from each clip")
    frame_size: int = Field(128, ge=16, le=1024, description="sampled frames: square side, pixels")
    # Shots
    cut_threshold: float = Field(3.0, gt=0, description="a hard cut's frame change stands this many times above its neighbours' (PySceneDetect AdaptiveDetector)")
    cut_min_change: float = Field(15.0, ge=0, description="and is at least this (PySceneDetect content_val, 0..255)")
    transition_ratio: float = Field(2.5, ge=1, description="a gradual transition changes the picture this many times more than the frames around it")
    transition_min_change: float = Field(25.0, ge=0, description="mean abs difference (0..255) across a gradual transition")
    transition_max_s: float = Field(2.0, gt=0, le=10, description="longest gradual transition looked for, seconds")
    cut_margin_frames: int = Field(2, ge=0, description="frames dropped beside each cut")
    # Video gates
    min_duration_s: float = Field(1.0, ge=0)
    max_duration_s: float | None = Field(None, gt=0)
    min_short_side: int = Field(96, ge=1, description="pixels")
    min_fps: float = Field(4.0, ge=0)
    # Clip gates
    min_clip_s: float = Field(1.0, ge=0, description="a shot shorter than this yields a rejected clip")
    black_threshold: float = Field(16.0, ge=0, description="mean luma below this is black")
    blank_threshold: float = Field(4.0, ge=0, description="luma std below this is a flat frame")
    static_threshold: float = Field(0.5, ge=0, description="mean abs frame difference below this is static")
    # Models (pretrained "none" = a random-init model, recorded as such in every row it shaped)
    clip_model: str | None = Field("ViT-B-32", description="open_clip model for embeddings; None: no embeddings, no dedup")
    clip_pretrained: str = Field("none", description="open_clip pretrained tag (from the local cache), a checkpoint file, or none")
    caption_model: str | None = Field("coca_ViT-B-32", description="open_clip CoCa model for clips without a caption; None: flag them")
    caption_pretrained: str = Field("none")
    caption_max_tokens: int = Field(20, ge=1, le=77)
    min_text_score: float | None = Field(None, ge=-1, le=1, description="reject clips whose caption-frame cosine is lower")
    dedup_max_distance: float | None = Field(0.01, ge=0, le=2, description="cosine distance that makes a near-duplicate (real CLIP weights only)")
    fingerprint_max_bits: float | None = Field(8.0, ge=0, le=64, description="mean differing pHash bits per frame that make a near-duplicate of another video's clip (weight-free); None: off")
    tokenizer: str | None = Field(None, description="tokenizer checkpoint id (default: the lake's latest; none in lake: skip)")
    # Execution
    workers: int | None = Field(None, ge=1, description="parallel decode tasks (default: the cluster's CPUs)")
    commit_every: int = Field(256, ge=1, description="clips per lake commit")
    lease_timeout_s: float = Field(600.0, gt=0, description="how long to wait for another build's commit")

    def hash(self) -> str:
        """A short content hash of the settings that shape rows (execution knobs excluded)."""
        shaping = self.model_dump(exclude={"workers", "commit_every", "lease_timeout_s"})
        return settings_hash(shaping)
