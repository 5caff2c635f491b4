"""CLIP embeddings of clips: open_clip image embeddings, a text-frame score, and the text gate.

Weights never come from the network here. `pretrained` is an open_clip tag found in the local cache
(Hugging Face hub cache, or open_clip's own ~/.cache/clip for URL weights), a checkpoint file, or
"none": a random-init model, seeded, so every actor and every later query builds the same one and
their embeddings stay comparable. Each row records the model and weights that made it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from gr2.errors import Gr2Error
from gr2.lake.query import sql_literal
from gr2.video import gates

RANDOM_INIT = "none"
RANDOM_INIT_SEED = 0


class ModelWeightsError(Gr2Error):
    """A CLIP/CoCa model or its weights that cannot be had; names what was looked for."""


@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from: `tag` is what rows record, `path` the file (None: random)."""

    model_name: str
    tag: str
    path: str | None
    preprocess: dict  # the tag's own mean/std/interpolation overrides, when it has any
    quick_gelu: bool = False


def resolve_weights(model_name: str, pretrained: str, cache_dir: str | None = None) -> Weights:
    """Find `model_name`'s weights `pretrained` on this machine, or raise ModelWeightsError."""
    import open_clip

    if open_clip.get_model_config(model_name) is None:
        raise ModelWeightsError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    pretrained = (pretrained or RANDOM_INIT).strip()
    if pretrained.lower() == RANDOM_INIT:
        return Weights(model_name, RANDOM_INIT, None, {})
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        if os.path.isfile(pretrained):
            return Weights(model_name, os.path.abspath(pretrained), os.path.abspath(pretrained), {})
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ModelWeightsError(
            f"{model_name} weights {pretrained!r}: no such checkpoint file, and not an open_clip tag for "
            f"{model_name} (tags: {', '.join(tags) or 'none'})")
    found, looked = _cached_file(cfg, cache_dir)
    if found is None:
        raise ModelWeightsError(
            f"{model_name} weights {pretrained!r} are not in the local cache (looked for {' and '.join(looked)}); "
            f"nothing is downloaded at run time: fetch them once with open_clip.create_model({model_name!r}, "
            f"pretrained={pretrained!r}) where there is network, or pass a checkpoint file")
    keep = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    return Weights(model_name, pretrained, found, keep, bool(cfg.get("quick_gelu", False)))


def _cached_file(cfg: dict, cache_dir: str | None) -> tuple[str | None, list[str]]:
    """The cached weights file a pretrained config names (without downloading), and where it looked."""
    from huggingface_hub import constants, try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    looked = []
    if cfg.get("hf_hub"):
        # The same file open_clip would fetch: "org/repo/" means its default name, and a .safetensors
        # sibling is preferred when one is cached.
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else filename.rsplit(".", 1)[0] + ".safetensors"
        names = [safe, filename] if filename.endswith((".bin", ".pth")) else [filename]
        root = cache_dir or constants.HF_HUB_CACHE
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(hit, str):
                return hit, looked
            looked.append(os.path.join(root, f"models--{repo.replace('/', '--')}", "snapshots", "*", name))
    if cfg.get("url"):
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(path):
            return path, looked
        looked.append(path)
    return None, looked


class _RandomInitAskedFor(logging.Filter):
    """open_clip warns on the root logger that a model without weights is random: here it was asked
    for by name ("none") and every row it shapes says so, so the warning is not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def load_model(model_name: str, pretrained: str, cache_dir: str | None = None, device: str | None = None):
    """(model in eval mode, Weights, preprocess dict) for `model_name` with weights `pretrained`."""
    import open_clip
    import torch

    weights = resolve_weights(model_name, pretrained, cache_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Seeded on a forked RNG: the same random model everywhere, and the caller's RNG left alone.
    quiet = _RandomInitAskedFor()
    logging.getLogger().addFilter(quiet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            model = open_clip.create_model(
                model_name, pretrained=weights.path, device=device, force_quick_gelu=weights.quick_gelu,
                force_preprocess_cfg=weights.preprocess or None)
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            raise ModelWeightsError(f"{model_name}: cannot load weights {weights.path} ({str(e).splitlines()[0][:200]})") from None
        finally:
            logging.getLogger().removeFilter(quiet)
    model.eval()
    return model, weights, dict(model.visual.preprocess_cfg)


def embedding_dim(model_name: str) -> int:
    """Width of `model_name`'s embeddings, from its config (nothing loaded)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ModelWeightsError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    return int(cfg["embed_dim"])


def to_model_input(frames: np.ndarray, preprocess: dict, device):
    """uint8 frames [N, H, W, 3] as the normalised float tensor [N, 3, size, size] the model takes."""
    import torch
    import torch.nn.functional as F

    # Frames arrive as a batch of arrays, so resizing as one tensor beats a PIL round trip per frame.
    size = preprocess["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float().div_(255)
    h, w = x.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top:top + s, left:left + s]
    if x.shape[-1] != size:
        mode = "bicubic" if preprocess.get("interpolation", "bicubic") == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False).clamp_(0, 1)
    mean = torch.tensor(preprocess["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"], device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def text_of(value) -> str | None:
    """A caption cell as text, or None when it holds none (None, NaN, blank)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value.strip() if isinstance(value, str) and value.strip() else None


def encode_text(model, tokenizer, texts: list[str], device) -> np.ndarray:
    """L2-normalised float32 text embeddings [N, D] of `texts` through `model`'s text tower."""
    import torch

    with torch.inference_mode():
        tokens = tokenizer(list(texts)).to(device)
        return torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).cpu().numpy()


class TextEmbedder:
    """A CLIP text tower: texts -> the embeddings the lake stores beside captions and instructions.

    Built as ClipEmbedder builds its model (the same seeded random init for "none"), so a text it
    embeds matches what a build, an ingest or a policy embeds. Each text is embedded on its own: a
    vector must not depend on which other texts shared its batch."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str = RANDOM_INIT, cache_dir: str | None = None,
                 device: str | None = "cpu"):
        import open_clip

        self.model, self.weights, _ = load_model(model_name, pretrained, cache_dir, device)
        self.model.visual = None  # only the text tower is used
        self.device = next(self.model.parameters()).device
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name, self.dim = model_name, embedding_dim(model_name)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([encode_text(self.model, self.tokenizer, [t], self.device) for t in texts])


class ClipEmbedder:
    """Stage: `embedding`, `clip_model`, `clip_pretrained` and `text_score` for every clip, and the
    caption's `caption_embedding` with its `text_model` and `text_pretrained` (null uncaptioned).

    `embedding` is the mean of the clip's L2-normalised frame embeddings, normalised again; a failed
    clip (no real frames) gets NaN, which the lake stores as null. `text_score` is the cosine between
    the caption and the embedding. With `min_text_score`, an accepted clip scoring below it is
    rejected ("text: ..."); uncaptioned clips have no score and pass. Random-init weights gate
    nothing: their score is recorded (rows say clip_pretrained="none") but means nothing.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str = RANDOM_INIT,
                 min_text_score: float | None = None, cache_dir: str | None = None,
                 device: str | None = None, max_frames: int = 64):
        import open_clip

        self.model, self.weights, self.preprocess = load_model(model_name, pretrained, cache_dir, device)
        self.device = next(self.model.parameters()).device
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name, self.dim = model_name, embedding_dim(model_name)
        self.min_text_score, self.max_frames = min_text_score, max_frames

    def embed_frames(self, frames: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings [N, D] of uint8 frames [N, H, W, 3]."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(frames), self.max_frames):
                x = to_model_input(frames[i:i + self.max_frames], self.preprocess, self.device)
                out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings [N, D]."""
        return encode_text(self.model, self.tokenizer, texts, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["clip_id"])
        live = [i for i in range(n) if "status" not in batch or str(batch["status"][i]) != "failed"]
        emb = np.full((n, self.dim), np.nan, np.float32)
        if live:
            frames = [np.asarray(batch["frames"][i]) for i in live]
            per_frame = self.embed_frames(np.concatenate(frames))
            bounds = np.cumsum([0] + [len(f) for f in frames])
            for j, i in enumerate(live):
                mean = per_frame[bounds[j]:bounds[j + 1]].mean(axis=0)
                emb[i] = mean / max(float(np.linalg.norm(mean)), 1e-12)

        scores = np.full(n, np.nan, np.float32)
        # every caption gets its embedding (failed clips' too: the text is there), one batch for all
        captions = {i: text_of(batch["caption"][i]) for i in range(n)} if "caption" in batch else {}
        captioned = [i for i, c in captions.items() if c]
        text_emb = np.full((n, self.dim), np.nan, np.float32)
        if captioned:
            text_emb[captioned] = self.embed_text([captions[i] for i in captioned])
        alive = set(live)
        scored = [i for i in captioned if i in alive]
        if scored:
            scores[scored] = np.einsum("nd,nd->n", text_emb[scored], emb[scored])
        low = self.min_text_score if self.weights.tag != RANDOM_INIT else None
        too_low = {i: f"text: score {scores[i]:.3f} < {low}" for i in scored if low is not None and scores[i] < low}
        return gates.reject({
            **batch, "embedding": emb, "text_score": scores,
            "clip_model": np.array([self.model_name] * n, dtype=object),
            "clip_pretrained": np.array([self.weights.tag] * n, dtype=object),
            "caption_embedding": text_emb,  # NaN rows: no caption, stored as null
            "text_model": np.array([self.model_name if captions.get(i) else "" for i in range(n)], dtype=object),
            "text_pretrained": np.array([self.weights.tag if captions.get(i) else "" for i in range(n)], dtype=object),
        }, [too_low.get(i) for i in range(n)])


def check_lake_model(lake, model_name: str, pretrained: str) -> None:
    """Raise ModelWeightsError when `lake`'s clips were embedded by another model or other real weights.

    Embeddings of different models (or weights) are not comparable: mixing them in one lake would
    break near-duplicate detection and search. Random-init rows commit the lake to nothing (their
    embeddings mean nothing), except their width: the embedding column's type is fixed. Call before
    a build starts.
    """
    if not lake.exists("clips"):
        return
    ds = lake.dataset("clips")
    if "clip_model" not in ds.schema.names:
        return
    tag = resolve_weights(model_name, pretrained).tag
    real = f"clip_model IS NOT NULL AND clip_pretrained != {sql_literal(RANDOM_INIT)}"
    made = ds.to_table(columns=["clip_model", "clip_pretrained"], filter=real, limit=1).to_pylist()
    if made and (made[0]["clip_model"], made[0]["clip_pretrained"]) != (model_name, tag):
        raise ModelWeightsError(
            f"lake {lake.root} holds embeddings of {made[0]['clip_model']} weights {made[0]['clip_pretrained']!r}; "
            f"this build asks for {model_name} weights {tag!r}: use the same model or another lake")
    width = ds.schema.field("embedding").type.list_size if "embedding" in ds.schema.names else None
    if width is not None and width != embedding_dim(model_name):
        raise ModelWeightsError(
            f"lake {lake.root} stores {width}-wide embeddings; {model_name}'s are {embedding_dim(model_name)} wide: "
            f"use a model of that width or another lake")


def embedder_for(lake, version: int | str | None = None) -> "ClipEmbedder":
    """A ClipEmbedder with the model and weights the lake's clips were embedded with."""
    from gr2.lake.query import QueryError, clips_dataset, open_lake

    ds = clips_dataset(open_lake(lake), version)
    made = []
    if "clip_model" in ds.schema.names:
        # The lake's real weights when it has any: random-init rows beside them commit it to nothing.
        for where in (f"clip_model IS NOT NULL AND clip_pretrained != {sql_literal(RANDOM_INIT)}", "clip_model IS NOT NULL"):
            made = made or ds.to_table(columns=["clip_model", "clip_pretrained"], filter=where, limit=1).to_pylist()
    if not made:
        raise QueryError("the lake's clips have no embeddings: text search needs a build with CLIP embeddings")
    return ClipEmbedder(made[0]["clip_model"], made[0]["clip_pretrained"])
