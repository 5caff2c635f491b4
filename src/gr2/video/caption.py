"""Captions: the source's caption wins; else CoCa (through open_clip) writes one; else none, flagged.

`caption_source` says which: source | coca | none. A random-init CoCa (pretrained "none") writes
nothing: its text reads like `!!!!!!!!` and must never pass for a caption, so those clips are
flagged "none" like any other uncaptioned clip. Only accepted clips are sent to CoCa (the most
expensive stage of the build); a clip a cheap gate rejected keeps what its source gave, or none.
Inside the pipeline a missing text is "" (build.TEXT_COLUMNS: Ray cannot type a column of only None).
"""

from __future__ import annotations

import numpy as np

from gr2.video.embed import RANDOM_INIT, ModelWeightsError, load_model, text_of, to_model_input

GENERATIONS = ("greedy", "beam_search")


class Captioner:
    """Stage: `caption`, `caption_source`, `caption_model` for every clip.

    `model_name=None` or random-init weights generate nothing: clips without a source caption are
    flagged caption_source="none". CoCa with real weights captions the clip's middle sampled frame.
    """

    def __init__(self, model_name: str | None = "coca_ViT-B-32", pretrained: str = RANDOM_INIT,
                 max_tokens: int = 20, generation: str = "greedy", cache_dir: str | None = None,
                 device: str | None = None):
        if generation not in GENERATIONS:
            raise ModelWeightsError(f"generation {generation!r}: expected one of {', '.join(GENERATIONS)}")
        self.model, self.real = None, False
        self.model_name, self.max_tokens, self.generation = model_name, max_tokens, generation
        if model_name is None:
            return
        import open_clip

        if not model_name.startswith("coca"):
            raise ModelWeightsError(f"captioning model {model_name!r} is not a CoCa model (e.g. coca_ViT-B-32)")
        if generation == "beam_search":
            from open_clip import coca_model

            if not coca_model._has_transformers:
                raise ModelWeightsError("beam_search captions need the `transformers` package: pip install 'gr2[caption]'")
        self.model, weights, self.preprocess = load_model(model_name, pretrained, cache_dir, device)
        self.device = next(self.model.parameters()).device
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.recorded = f"{model_name}/{weights.tag}"
        # Random weights are loaded all the same (a bad model name fails alike, caption_frames
        # still runs), but what they write is never stored as a caption.
        self.real = weights.tag != RANDOM_INIT

    def caption_frames(self, frames: np.ndarray) -> list[str]:
        """One caption per uint8 frame [N, H, W, 3]."""
        import torch

        with torch.inference_mode():
            x = to_model_input(frames, self.preprocess, self.device)
            if self.generation == "beam_search":
                tokens = self.model.generate(x, seq_len=self.max_tokens + 1)
            else:
                tokens = self._greedy(x)
        return [self._text(t) for t in tokens.tolist()]

    def _greedy(self, images):
        """Greedy decoding over CoCa's own forward pass.

        open_clip's `generate` drives this same loop through transformers' logits processors and
        beam scorer; greedy needs neither, so captioning works without transformers installed.
        """
        import torch

        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        encoded = self.model(images)
        latent, embs = encoded["image_features"], encoded["image_embs"]
        out = torch.full((len(images), 1), sot, dtype=torch.long, device=images.device)
        done = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        for step in range(self.max_tokens):
            logits = self.model(images, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            if step == 0:
                logits[:, eot] = float("-inf")  # at least one word
            nxt = torch.where(done, torch.full_like(done, eot, dtype=torch.long), logits.argmax(-1))
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eot
            if bool(done.all()):
                break
        return out

    def _text(self, ids: list[int]) -> str:
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        ids = ids[1:]  # after the start token; what follows the end token is padding
        if eot in ids:
            ids = ids[:ids.index(eot)]
        ids = [i for i in ids if i != sot]
        return " ".join(self.tokenizer.decode(ids).split())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["clip_id"])
        status = [str(s) for s in batch["status"]] if "status" in batch else ["accepted"] * n
        captions = [text_of(c) for c in batch["caption"]] if "caption" in batch else [None] * n
        sources = ["source" if c else "none" for c in captions]
        models = [""] * n
        todo = [i for i in range(n) if not captions[i] and status[i] == "accepted"]
        if self.real and todo:
            middle = np.stack([np.asarray(batch["frames"][i])[len(batch["frames"][i]) // 2] for i in todo])
            for i, text in zip(todo, self.caption_frames(middle)):
                if text:
                    captions[i], sources[i], models[i] = text, "coca", self.recorded
        return {
            **batch, "caption": np.array([c or "" for c in captions], dtype=object),
            "caption_source": np.array(sources, dtype=object),
            "caption_model": np.array(models, dtype=object),
        }


def counts(rows: list[dict]) -> dict[str, int]:
    """Clips by caption source, for the build's funnel: captions_source, captions_coca, captions_none."""
    out = {f"captions_{k}": 0 for k in ("source", "coca", "none")}
    for row in rows:
        out[f"captions_{row.get('caption_source') or 'none'}"] += 1
    return out
