"""Tokenizer losses: pixel reconstruction, and a PatchGAN discriminator for sharper decodes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, l1: float = 1.0, l2: float = 0.0) -> torch.Tensor:
    """Weighted L1 + L2 between images in the same range."""
    loss = x.new_zeros(())
    if l1:
        loss = loss + l1 * F.l1_loss(recon, x)
    if l2:
        loss = loss + l2 * F.mse_loss(recon, x)
    return loss


def psnr(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB [B] for images in [0, 1]."""
    mse = (x.float() - recon.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN): one real-or-fake logit per overlapping image patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            # GroupNorm rather than BatchNorm: the same under DDP and at batch size 1.
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False),
                    nn.GroupNorm(math.gcd(32, out), out), nn.LeakyReLU(0.2)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
