"""The lake's models registry: where checkpoints live under <root>/models, and which are there.

    <root>/models/tokenizers/<checkpoint id>/config.json       VQ tokenizers        "gr2.tokenizer/1"
    <root>/models/gr2/<run id>/step-<n>/config.json            GR-2 training runs   "gr2.model/1"

The lake reads a checkpoint's config.json (format, checkpoint_id, info) and never its weights: what a
format holds is its writer's business (gr2.tokenizers, gr2.training.checkpoint), so the lake knows
formats only by name. A directory without config.json is a save that never finished (weights are
written first) and is not listed; a config.json that does not parse is listed under its directory's
name, so that loading it fails with the checkpoint's own error rather than another one being picked
silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from gr2.lake.uri import glob, join, url_to_fs


@dataclass(frozen=True)
class Kind:
    """One kind of checkpoint: its directory under <root>/models, the pattern of one checkpoint's
    directory below that, and the format its config.json names."""

    directory: str
    pattern: str
    format: str


KINDS = {
    "tokenizer": Kind("tokenizers", "*", "gr2.tokenizer/1"),
    "gr2": Kind("gr2", "*/step-*", "gr2.model/1"),
}
MIN_PREFIX = 4  # a shorter id prefix would name a checkpoint by luck


@dataclass(frozen=True)
class Saved:
    """A checkpoint in the lake: its id, directory, when it was saved (epoch seconds) and config.json."""

    checkpoint_id: str
    path: str
    saved_at: float
    meta: dict = field(default_factory=dict)

    @property
    def info(self) -> dict:
        """What its trainer recorded beside the weights (tokenizers: metrics, run, trained_at)."""
        return dict(self.meta.get("info") or {})


def kind_of(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of model {kind!r}: {' or '.join(KINDS)}")
    return KINDS[kind]


def directory(root: str, kind: str) -> str:
    """Where checkpoints of `kind` live under the lake at `root`."""
    return join(root, "models", kind_of(kind).directory)


def listing(root: str, kind: str) -> list[Saved]:
    """Every complete checkpoint of `kind` under the lake at `root`, oldest first."""
    k = kind_of(kind)
    found = [_saved(config) for config in glob(join(directory(root, kind), k.pattern, "config.json"))]
    return sorted((s for s in found if s.meta.get("format", k.format) == k.format), key=lambda s: s.saved_at)


def matching(found: list[Saved], ref: str) -> list[Saved]:
    """The checkpoints of `found` whose id is `ref`, else those whose id begins with it."""
    exact = [s for s in found if s.checkpoint_id == ref]
    return exact or [s for s in found if len(ref) >= MIN_PREFIX and s.checkpoint_id.startswith(ref)]


def _saved(config: str) -> Saved:
    path = config.rsplit("/", 1)[0]
    fs, config_path = url_to_fs(config)
    try:
        with fs.open(config_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        meta = {}
    checkpoint_id = str(meta.get("checkpoint_id") or path.rsplit("/", 1)[-1])
    return Saved(checkpoint_id, path, _saved_at(meta) or fs.modified(config_path).timestamp(), meta)


def _saved_at(meta: dict) -> float | None:
    """When a checkpoint was saved, as its config.json records it (GR-2: saved_at; tokenizers: info.trained_at)."""
    if isinstance(meta.get("saved_at"), (int, float)):
        return float(meta["saved_at"])
    try:
        return datetime.fromisoformat(str((meta.get("info") or {}).get("trained_at"))).timestamp()
    except (ValueError, TypeError, AttributeError):
        return None
