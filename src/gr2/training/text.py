"""Language for the GR-2 model: a frozen open_clip text tower, built from the model config, for
models fed raw strings. Lake-trained models never use it: their batches carry the lake's stored
text embeddings (data.py), so training, evaluation and the policy see identical vectors.

The tower's weights come through the video build's resolver (gr2.video.embed.resolve_weights): an
open_clip tag already in the local cache, a checkpoint file, or none (random init); nothing is
downloaded, and weights that are not here stop the run with an error naming what was looked for.
Checkpoints never hold the tower (it is frozen): config.clip_model and clip_pretrained rebuild it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gr2.training.model import GR2Config
from gr2.video.embed import RANDOM_INIT, RANDOM_INIT_SEED, resolve_weights


class TextEncoder(nn.Module):
    """A frozen open_clip text tower: strings -> L2-normalised (B, embed_dim) embeddings."""

    def __init__(self, model_name: str, pretrained: str | None = None):
        """pretrained: an open_clip tag in the local cache, a checkpoint file, or None (random init)."""
        super().__init__()
        import open_clip

        weights = resolve_weights(model_name, pretrained or RANDOM_INIT)
        # Seeded on a forked RNG, as the video build seeds its random models: a random tower is
        # rebuilt alike when a checkpoint loads, and the caller's RNG is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            # pretrained_text=False: no Hugging Face text weights fetched behind the tag's back
            clip = open_clip.create_model(model_name, pretrained=weights.path, pretrained_text=False,
                                          force_quick_gelu=weights.quick_gelu)
        clip.visual = None  # only the text tower is used; don't carry the image tower's weights
        self.clip = clip.requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.embed_dim = open_clip.get_model_config(model_name)["embed_dim"]
        self.model_name, self.pretrained = model_name, pretrained

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # frozen: dropout stays off whatever the parent does

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.clip.parameters()).device
        return self.clip.encode_text(self.tokenizer(list(texts)).to(device), normalize=True).float()


def text_encoder_for(config: GR2Config) -> TextEncoder | None:
    """The tower `config` names (clip_model, clip_pretrained); None when batches carry embeddings."""
    return TextEncoder(config.clip_model, config.clip_pretrained) if config.clip_model is not None else None
