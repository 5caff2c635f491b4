"""Quantizers that turn encoder features into discrete codes: an EMA codebook and FSQ."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Quantized(NamedTuple):
    """What a quantizer returns for a feature map [B, D, h, w]."""

    z_q: torch.Tensor  # [B, D, h, w], straight-through: gradients flow to the encoder
    indices: torch.Tensor  # [B, h, w] long
    loss: torch.Tensor  # scalar commitment loss (zero for FSQ)


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Fraction of codes used and perplexity (exp of the usage entropy) from per-code counts."""
    counts = counts.double()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return {
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(entropy)),
    }


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EMACodebook(nn.Module):
    """Codebook of unit vectors: cosine-similarity lookup, EMA updates and dead-code restarts.

    Unit vectors in a low dimension (ViT-VQGAN's recipe) keep most codes in use; EMA updates
    move codes without a codebook loss; a code whose EMA count falls below `dead_threshold`
    is restarted on a random encoder output from the current batch.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        decay: float = 0.99,
        beta: float = 0.25,
        dead_threshold: float = 0.5,
    ):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.beta, self.dead_threshold = decay, beta, dead_threshold
        self.register_buffer("embedding", F.normalize(torch.randn(codebook_size, dim), dim=1))
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", self.embedding.clone())
        # Data-dependent init on the first training batch: random unit vectors in `dim`
        # are far from where the encoder's outputs live, and most of them would die at once.
        self.register_buffer("initialised", torch.tensor(False))
        self.restarts = 0  # codes restarted at the last update, for training logs

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code (by cosine similarity) for each vector of `z` [N, dim] -> [N]."""
        return (F.normalize(z.float(), dim=1) @ self.embedding.t()).argmax(dim=1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for `indices` [B, h, w] -> [B, dim, h, w]."""
        return F.embedding(indices, self.embedding).permute(0, 3, 1, 2).contiguous()

    def reencode_loss(self, z: torch.Tensor, indices: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """How far features z [B, dim, h, w] land from codes `indices` [B, h, w], per token.

        temperature None: the mean squared distance to the code. Otherwise a cross-entropy over
        all codes with cosine / temperature logits, which keeps pushing until the right code
        wins by a margin. Only safe with the codebook and the target tokens fixed (the training
        loop's consistency phase): while they learn, the cheapest margin is fewer codes in use
        (usage fell to 15% within 50 steps).
        """
        flat = F.normalize(z.float(), dim=1)
        if temperature is None:
            return (flat - self.embed(indices)).pow(2).sum(dim=1).mean()
        logits = torch.einsum("bdhw,kd->bkhw", flat, self.embedding) / temperature
        return F.cross_entropy(logits, indices)

    def forward(self, z: torch.Tensor) -> Quantized:
        b, d, h, w = z.shape
        flat = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, d), dim=1)
        if self.training:
            self._update(flat)
        indices = (flat @ self.embedding.t()).argmax(dim=1)
        q = self.embedding[indices]
        # Squared distance per token, not per element: per element, the pull toward the code
        # shrinks with `dim`, features stay between codes (median cosine 0.94 to their code,
        # 0.91 between neighbouring codes) and a decoded image's tokens flip.
        loss = self.beta * (flat - q.detach()).pow(2).sum(dim=1).mean()
        q = flat + (q - flat).detach()
        z_q = q.view(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return Quantized(z_q, indices.view(b, h, w), loss)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor) -> None:
        if not bool(self.initialised):
            self._restart(torch.arange(self.codebook_size, device=flat.device), flat)
            self.cluster_size.fill_(1.0)
            self.initialised.fill_(True)
        indices = (flat @ self.embedding.t()).argmax(dim=1)
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        live = self.cluster_size >= self.dead_threshold
        self.embedding[live] = F.normalize(self.embed_sum[live], dim=1)
        dead = (~live).nonzero().flatten()
        self.restarts = int(dead.numel())
        if dead.numel():
            # Restart onto vectors the codebook serves worst (sampled by their distance to the
            # nearest code, as k-means++ seeds): uniform picks land mostly in dense regions and
            # crowd them with near-duplicate codes, between which tokens then flip.
            error = 1 - (flat @ self.embedding.t()).max(dim=1).values
            self._restart(dead, flat, weights=error.clamp(min=1e-6))

    @torch.no_grad()
    def _restart(self, codes: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Move `codes` onto batch vectors drawn by `weights` (rank 0's draw, so ranks agree)."""
        if weights is None:
            weights = torch.ones(flat.shape[0], device=flat.device)
        pick = torch.multinomial(weights, codes.numel(), replacement=codes.numel() > flat.shape[0])
        new = F.normalize(flat[pick] + 1e-3 * torch.randn_like(flat[pick]), dim=1)
        if _distributed():
            dist.broadcast(new, src=0)
        self.embedding[codes] = new
        # A restarted code gets one threshold's worth of credit: it survives a few dozen
        # steps to win vectors before it can be restarted again.
        self.cluster_size[codes] = 2 * self.dead_threshold
        self.embed_sum[codes] = new * 2 * self.dead_threshold


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): each channel rounded to a few levels.

    There is no codebook to learn or collapse; the implicit codebook is the product of `levels`.
    """

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        self.levels = tuple(int(n) for n in levels)
        self.dim = len(self.levels)
        self.codebook_size = math.prod(self.levels)
        lv = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1]), dim=0)
        # Not part of the state dict: they follow from `levels`, which the config holds.
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        half = (self._levels - 1) * (1 - 1e-3) / 2
        # Even level counts have no zero level: shift by half a step so rounding gives L values.
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _scaled(self, z: torch.Tensor) -> torch.Tensor:
        """Rounded values in [-1, 1] with a straight-through gradient; z is [..., dim]."""
        bounded = self._bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return rounded / (self._levels // 2)

    def _to_indices(self, scaled: torch.Tensor) -> torch.Tensor:
        half = self._levels // 2
        digits = torch.round(scaled * half + half).long()
        return (digits * self._basis).sum(dim=-1)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Code index for each vector of `z` [N, dim] -> [N]."""
        return self._to_indices(self._scaled(z.float()))

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for `indices` [B, h, w] -> [B, dim, h, w]."""
        half = self._levels // 2
        digits = (indices.unsqueeze(-1) // self._basis) % self._levels.long()
        return ((digits - half) / half).permute(0, 3, 1, 2).contiguous()

    def reencode_loss(self, z: torch.Tensor, indices: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """How far features z [B, dim, h, w] land from codes `indices` [B, h, w], per token.

        temperature None: the mean squared distance to the code. Otherwise, per channel, a
        cross-entropy over that channel's levels with -(distance / step)^2 / temperature logits.
        """
        unrounded = self._bound(z.float().permute(0, 2, 3, 1)) / (self._levels // 2)  # [B, h, w, dim]
        target = self.embed(indices).permute(0, 2, 3, 1)
        if temperature is None:
            return (unrounded - target).pow(2).sum(dim=-1).mean()
        loss = unrounded.new_zeros(())
        for c, n in enumerate(self.levels):
            half = n // 2
            values = (torch.arange(n, device=z.device) - half) / half  # this channel's levels in [-1, 1]
            logits = -((unrounded[..., c, None] - values) * half).pow(2) / temperature
            level = torch.round(target[..., c] * half + half).long()
            loss = loss + F.cross_entropy(logits.reshape(-1, n), level.flatten())
        return loss

    def forward(self, z: torch.Tensor) -> Quantized:
        scaled = self._scaled(z.float().permute(0, 2, 3, 1))
        indices = self._to_indices(scaled.detach())
        return Quantized(scaled.permute(0, 3, 1, 2).contiguous(), indices, z.new_zeros(()))
