"""The VQ image tokenizer: a VQGAN-style conv encoder, a quantizer and a conv decoder."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .quantize import FSQ, EMACodebook, Quantized


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything that shapes the tokenizer's weights; hashed into the checkpoint id."""

    resolution: int = 64  # training resolution; any H, W divisible by `downsample` encodes
    downsample: int = 8  # f: a 64x64 image becomes an 8x8 token grid at f=8
    # Pixels folded into channels (space-to-depth) before the first conv and unfolded after the
    # last: full-resolution convs dominate the cost on CPU, and the token grid's resolution, not
    # the stem's, bounds the reconstruction. 1 is plain VQGAN.
    patch_size: int = 1
    channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] | None = None  # per level; None: (1, 2, 2, 4, 4)[:levels]
    num_res_blocks: int = 1  # per level (the decoder has one more, as in VQGAN)
    z_channels: int = 128  # encoder output / decoder input width
    quantizer: str = "ema"  # "ema": l2-normalised EMA codebook; "fsq": finite scalar levels
    codebook_size: int = 1024  # "ema" only; FSQ's size is the product of `fsq_levels`
    code_dim: int = 32  # "ema" only: dimension of the unit-norm code vectors
    ema_decay: float = 0.99
    # beta in the commitment loss, a squared distance per token (0.25 per element over code_dim 32,
    # VQGAN's usual beta, is ~0.008 per token). Measured at floor scale (benchmarks/tokenizer_floor.py,
    # 1200 steps): 0.008 -> 24.5 dB, 58% of codes, 84% re-encode agreement; 0.05 -> 24.9 dB, 68%,
    # 71%; 0.25 used 2% of the codes at step 50.
    commitment: float = 0.008
    dead_threshold: float = 0.5  # EMA count below which a code is restarted
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # 1000 codes (the FSQ paper's choice for ~2^10)

    def __post_init__(self):
        if self.downsample not in (4, 8, 16, 32):
            raise ValueError(f"downsample must be 4, 8, 16 or 32, got {self.downsample}")
        if self.patch_size not in (1, 2, 4) or self.patch_size >= self.downsample:
            raise ValueError(f"patch_size must be 1, 2 or 4 and below downsample, got {self.patch_size}")
        if self.resolution % self.downsample:
            raise ValueError(f"resolution {self.resolution} is not divisible by {self.downsample}")
        if self.channel_mult is not None and len(self.channel_mult) != self.levels:
            raise ValueError(
                f"channel_mult needs {self.levels} entries for downsample {self.downsample}, "
                f"got {self.channel_mult}"
            )
        if self.quantizer not in ("ema", "fsq"):
            raise ValueError(f"quantizer must be 'ema' or 'fsq', got {self.quantizer!r}")
        if self.num_codes > 65536:
            raise ValueError(f"{self.num_codes} codes do not fit the lake's uint16 token grids")
        # JSON round trips give lists; keep tuples so equal configs hash equal.
        for name in ("channel_mult", "fsq_levels"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))

    @property
    def levels(self) -> int:
        """Feature-map resolutions the encoder passes through (one per halving, plus the grid)."""
        return int(math.log2(self.downsample // self.patch_size)) + 1

    @property
    def mults(self) -> tuple[int, ...]:
        return self.channel_mult or (1, 2, 2, 4, 4, 4)[: self.levels]

    @property
    def num_codes(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return cls(**d)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        # Asymmetric padding as in VQGAN, so a stride-2 3x3 conv halves H and W exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.mults]
        self.stem = nn.PixelUnshuffle(cfg.patch_size)
        self.conv_in = nn.Conv2d(3 * cfg.patch_size**2, widths[0], 3, padding=1)
        blocks, cin = [], widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, width))
                cin = width
            if level < len(widths) - 1:
                blocks.append(Downsample(cin))
        blocks.append(ResBlock(cin, cin))  # the "mid" block, at the token grid's resolution
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(self.stem(x))))))


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.mults][::-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        blocks, cin = [ResBlock(widths[0], widths[0])], widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(cin, width))
                cin = width
            if level < len(widths) - 1:
                blocks.append(Upsample(cin))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3 * cfg.patch_size**2, 3, padding=1)
        self.unstem = nn.PixelShuffle(cfg.patch_size)

    def forward(self, z):
        return self.unstem(self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z))))))


def _frozen(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) with gradients to x only, none to the module's weights."""
    weights = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, weights, (x,), strict=False)


class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor  # [B, 3, H, W] in [-1, 1], unclamped (the loss wants it so)
    indices: torch.Tensor  # [B, h, w]
    quantizer_loss: torch.Tensor  # scalar
    reencode_loss: torch.Tensor  # scalar; zero unless asked for


def to_model_input(images: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images [B, 3, H, W] -> float32 in [-1, 1] on `device`."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(x.shape)}")
    x = x.to(device=device, non_blocking=True)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x * 2 - 1


class Tokenizer(nn.Module):
    """Images <-> grids of discrete tokens. `encode` and `decode` are the inference API."""

    def __init__(self, config: TokenizerConfig = TokenizerConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quantizer == "fsq":
            self.quantizer = FSQ(config.fsq_levels)
        else:
            self.quantizer = EMACodebook(
                config.codebook_size,
                config.code_dim,
                decay=config.ema_decay,
                beta=config.commitment,
                dead_threshold=config.dead_threshold,
            )
        # 1x1 convs between the wide feature map and the narrow code space, as in VQGAN.
        self.quant_conv = nn.Conv2d(config.z_channels, self.quantizer.dim, 1)
        self.post_quant_conv = nn.Conv2d(self.quantizer.dim, config.z_channels, 1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an image of `height` x `width` pixels."""
        f = self.config.downsample
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by downsample {f}")
        return height // f, width // f

    def _autocast(self):
        # bf16 on CUDA; CPU stays fp32, where bf16 convs are slower than fp32 ones.
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda")

    def forward(
        self,
        x: torch.Tensor,
        reencode: bool = False,
        extra_grids: torch.Tensor | None = None,
        reencode_temperature: float | None = None,
        targets: torch.Tensor | None = None,
    ) -> TokenizerOutput:
        """Training pass over model-space images x in [-1, 1] [B, 3, H, W].

        reencode: also return how far the reconstruction's own features land from the codes
        chosen for x. Training on it makes encode -> decode -> encode give the same tokens,
        which a reconstruction loss alone leaves to chance (~50-75% agreement here).
        extra_grids: token grids [E, h, w] to decode alongside x's and hold to the same
        re-encode loss (their reconstructions are not returned). Grids the data never produced
        teach the decoder to draw any token so the encoder reads it back, not just the token
        layouts of the training frames.
        reencode_temperature: None, a squared distance; else a cross-entropy over codes at this
        temperature (see the quantizer's reencode_loss).
        targets: the tokens x should have [B, h, w] (a frozen copy's, in the consistency
        phase). The quantizer is bypassed: the decoder draws `targets`, quantizer_loss holds
        x's features to them, and the re-encoding encoder learns to read decoded images too.
        """
        self.grid_shape(*x.shape[-2:])
        with self._autocast():
            z = self.quant_conv(self.encoder(x))
        if targets is None:
            q: Quantized = self.quantizer(z.float())
            codes, indices, quantizer_loss = q.z_q, q.indices, q.loss
        else:
            indices = targets
            codes = self.quantizer.embed(targets).to(z.dtype)
            quantizer_loss = self.quantizer.reencode_loss(z, targets, reencode_temperature)
        grids = indices
        if reencode and extra_grids is not None and len(extra_grids):
            codes = torch.cat([codes, self.quantizer.embed(extra_grids).to(codes.dtype)])
            grids = torch.cat([grids, extra_grids])
        with self._autocast():
            decoded = self.decoder(self.post_quant_conv(codes)).float()
        recon = decoded[: x.shape[0]]
        reencode_loss = recon.new_zeros(())
        if reencode:
            # While the codebook learns, the re-encoding encoder and quant_conv run with
            # detached weights: the loss trains the decoder (and, through x's straight-through
            # codes, the encoder that chose them), never the encoder's reading of decoded
            # images. Let that learn too and it finds the cheap way to agree with itself, fewer
            # codes (usage fell from 63% to 28% in 50 steps). With `targets` from a frozen copy
            # and the codebook fixed there is no such way out, and it learns.
            reader = (lambda m, v: m(v)) if targets is not None else _frozen
            with self._autocast():
                z_re = reader(self.quant_conv, reader(self.encoder, decoded.clamp(-1, 1)))
            reencode_loss = self.quantizer.reencode_loss(z_re, grids, reencode_temperature)
        return TokenizerOutput(recon, indices, quantizer_loss, reencode_loss)

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space images x in [-1, 1] [B, 3, H, W] -> token grid LongTensor [B, h, w]."""
        h, w = self.grid_shape(*x.shape[-2:])
        with self._autocast():
            z = self.quant_conv(self.encoder(x))
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.quantizer.dim)
        return self.quantizer.lookup(flat).view(x.shape[0], h, w)

    def encode(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Images [B, 3, H, W] (uint8, or float in [0, 1]) -> token grid LongTensor [B, h, w]."""
        return self.tokens(to_model_input(images, self.device))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Token grid [B, h, w] (any integer dtype) -> images float [B, 3, H, W] in [0, 1]."""
        t = torch.as_tensor(np.asarray(tokens, dtype=np.int64) if isinstance(tokens, np.ndarray) else tokens)
        if t.ndim != 3:
            raise ValueError(f"tokens must be [B, h, w], got shape {tuple(t.shape)}")
        t = t.to(self.device).long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_codes):
            raise ValueError(f"tokens out of range [0, {self.num_codes})")
        with self._autocast():
            x = self.decoder(self.post_quant_conv(self.quantizer.embed(t)))
        return ((x.float() + 1) / 2).clamp(0, 1)
