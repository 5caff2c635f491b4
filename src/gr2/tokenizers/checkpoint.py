"""Tokenizer checkpoints: safetensors weights + a JSON config, named by a content hash.

A checkpoint is a directory (local path or fsspec URI) holding

    model.safetensors   every tensor of the state dict (no pickle anywhere)
    config.json         {"format", "checkpoint_id", "config", "info"}

The checkpoint id is the first 16 hex digits of sha256 over the config and every tensor's name,
dtype, shape and bytes; rows tokenized with a checkpoint record it. Loading recomputes it, so
weights or a config changed after saving are caught at load, never mid-build.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from gr2.errors import Gr2Error

from .model import Tokenizer, TokenizerConfig

FORMAT = "gr2.tokenizer/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(Gr2Error):
    """A tokenizer checkpoint that cannot be loaded; the message names the file and the fault."""


class Checkpoint(NamedTuple):
    tokenizer: Tokenizer
    checkpoint_id: str
    info: dict[str, Any]  # what the saver recorded beside the weights (metrics, steps, data)


def _canonical_config(config: TokenizerConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


def _content_id(config: TokenizerConfig, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(_canonical_config(config).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _state(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}


def checkpoint_id(tokenizer: Tokenizer) -> str:
    """The id `tokenizer` would be saved under: a hash of its config and current weights."""
    return _content_id(tokenizer.config, _state(tokenizer))


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def save_checkpoint(tokenizer: Tokenizer, directory: str, info: dict[str, Any] | None = None) -> str:
    """Write `tokenizer` into `directory` (created if needed); returns the checkpoint id.

    `info` (JSON-serialisable: metrics, steps, data provenance) is stored but not hashed.
    """
    directory = str(directory)
    state = _state(tokenizer)
    cid = _content_id(tokenizer.config, state)
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    # Weights first, config last: a save killed half-way leaves no config.json, which load
    # reports, rather than a config pointing at half a weights file.
    with fs.open(_join(root, WEIGHTS), "wb") as f:
        f.write(save_safetensors(state, metadata={"checkpoint_id": cid, "format": FORMAT}))
    meta = {"format": FORMAT, "checkpoint_id": cid, "config": tokenizer.config.to_dict(), "info": info or {}}
    with fs.open(_join(root, CONFIG), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return cid


def _read(fs, path: str, what: str) -> bytes:
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from e


def read_config(directory: str) -> tuple[TokenizerConfig, str, dict[str, Any]]:
    """(config, checkpoint id, info) from a checkpoint's config.json, without the weights."""
    fs, root = fsspec.core.url_to_fs(str(directory))
    path = _join(root, CONFIG)
    raw = _read(fs, path, "the JSON config")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    for key in ("checkpoint_id", "config"):
        if key not in meta:
            raise CheckpointError(f"{path}: no {key!r} entry")
    try:
        config = TokenizerConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid tokenizer config: {e}") from e
    return config, str(meta["checkpoint_id"]), dict(meta.get("info") or {})


def _check_tensors(path: str, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    faults = []
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    if missing:
        faults.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        faults.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = [
        f"{k}: {tuple(got[k].shape)} {got[k].dtype} != {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in got and (got[k].shape != v.shape or got[k].dtype != v.dtype)
    ]
    if wrong:
        faults.append(f"wrong shapes/dtypes for the config: {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    if faults:
        raise CheckpointError(f"{path}: does not match its config: {', '.join(faults)}")


def load_checkpoint(directory: str, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; any fault raises CheckpointError naming the file."""
    config, recorded_id, info = read_config(directory)
    fs, root = fsspec.core.url_to_fs(str(directory))
    path = _join(root, WEIGHTS)
    raw = _read(fs, path, "the safetensors weights")
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    tokenizer = Tokenizer(config)
    _check_tensors(path, tokenizer.state_dict(), tensors)
    actual_id = _content_id(config, tensors)
    if actual_id != recorded_id:
        raise CheckpointError(
            f"{path}: content hash {actual_id} does not match the recorded checkpoint id "
            f"{recorded_id}: weights or config changed after saving"
        )
    tokenizer.load_state_dict(tensors, strict=True)
    return Checkpoint(tokenizer.to(device).eval(), actual_id, info)
