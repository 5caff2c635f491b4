"""Tokenizer checkpoints: safetensors weights + a JSON config, named by a content hash.

A checkpoint is a directory (local path or fsspec URI) holding

    model.safetensors   every tensor of the state dict (no pickle anywhere)
    config.json         {"format", "checkpoint_id", "config", "info"}

The checkpoint id is the first 16 hex digits of sha256 over the config and every tensor's name,
dtype, shape and bytes; rows tokenized with a checkpoint record it. Loading recomputes it, so
weights or a config changed after saving are caught at load, never mid-build. config.json is
written last and appears whole (renamed into place on a local disk), so a directory that has one
holds a complete checkpoint: resuming takes the newest such step.

GR-2 checkpoints (training/checkpoint.py) are the same format with other files and fields; the
format's pieces (`content_id`, `write_checkpoint`, `read_tensors`, `read_json`) live here, on the
floor both can reach.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from gr2.errors import Gr2Error
from gr2.lake.uri import url_to_fs

from .model import Tokenizer, TokenizerConfig

FORMAT = "gr2.tokenizer/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(Gr2Error):
    """A checkpoint (tokenizer or GR-2) that cannot be found, loaded or used as asked; the message names it."""


class Checkpoint(NamedTuple):
    tokenizer: Tokenizer
    checkpoint_id: str
    info: dict[str, Any]  # what the saver recorded beside the weights (metrics, steps, data)


# -- the format ---------------------------------------------------------------------------------------


def content_id(canonical_config: str, tensors: dict[str, torch.Tensor]) -> str:
    """16 hex digits of sha256 over a config's canonical JSON and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(canonical_config.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def write_checkpoint(directory: str, files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]],
                     config: dict[str, Any]) -> None:
    """Write safetensors `files` ({name: (tensors, metadata)}) into `directory` (created if needed),
    then `config` as config.json."""
    fs, root = url_to_fs(str(directory))
    fs.makedirs(root, exist_ok=True)
    # Weights first, config last: a save killed half-way leaves no config.json, which load
    # reports (and resuming skips), rather than a config pointing at half a weights file.
    for name, (tensors, metadata) in files.items():
        with fs.open(_join(root, name), "wb") as f:
            f.write(save_safetensors(tensors, metadata=metadata))
    text = json.dumps(config, indent=1, sort_keys=True)
    final = _join(root, CONFIG)
    if "file" in fs.protocol:
        # A local file exists, empty, from the moment it is opened: a reader or a save killed right then
        # would take it for a whole checkpoint (CI killed a worker on seeing it). Written aside and
        # renamed, it appears whole; an object store's PUT does that by itself.
        aside = f"{final}.{os.getpid()}.part"
        with open(aside, "w") as f:
            f.write(text)
        os.replace(aside, final)
    else:
        fs.pipe_file(final, text.encode())


def _path(directory: str, name: str) -> str:
    """The path of file `name` in checkpoint `directory`, as error messages name it."""
    return _join(url_to_fs(str(directory))[1], name)


def _read(directory: str, name: str, missing: str = "missing") -> bytes:
    fs, root = url_to_fs(str(directory))
    path = _join(root, name)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {missing}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e


def read_tensors(directory: str, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `name` in `directory`."""
    raw = _read(directory, name)
    try:
        return load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{_path(directory, name)}: not a readable safetensors file (truncated or corrupt?): "
                              f"{e}") from e


def read_json(directory: str, format: str) -> tuple[str, dict[str, Any]]:
    """(path, content) of the config.json in `directory`, checked to be a checkpoint of `format`."""
    path = _path(directory, CONFIG)
    raw = _read(directory, CONFIG, missing=f"missing (no {CONFIG}: not a checkpoint, or a save killed half-way)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != format:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format is {got!r}, expected {format!r}")
    return path, meta


# -- tokenizer checkpoints ----------------------------------------------------------------------------


def _canonical_config(config: TokenizerConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


def _state(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}


def checkpoint_id(tokenizer: Tokenizer) -> str:
    """The id `tokenizer` would be saved under: a hash of its config and current weights."""
    return content_id(_canonical_config(tokenizer.config), _state(tokenizer))


def save_checkpoint(tokenizer: Tokenizer, directory: str, info: dict[str, Any] | None = None) -> str:
    """Write `tokenizer` into `directory` (created if needed); returns the checkpoint id.

    `info` (JSON-serialisable: metrics, steps, data provenance) is stored but not hashed.
    """
    state = _state(tokenizer)
    cid = content_id(_canonical_config(tokenizer.config), state)
    meta = {"format": FORMAT, "checkpoint_id": cid, "config": tokenizer.config.to_dict(), "info": info or {}}
    write_checkpoint(directory, {WEIGHTS: (state, {"checkpoint_id": cid, "format": FORMAT})}, meta)
    return cid


def read_config(directory: str) -> tuple[TokenizerConfig, str, dict[str, Any]]:
    """(config, checkpoint id, info) from a checkpoint's config.json, without the weights."""
    path, meta = read_json(directory, FORMAT)
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
    tensors = read_tensors(directory)
    path = _path(directory, WEIGHTS)
    tokenizer = Tokenizer(config)
    _check_tensors(path, tokenizer.state_dict(), tensors)
    actual_id = content_id(_canonical_config(config), tensors)
    if actual_id != recorded_id:
        raise CheckpointError(
            f"{path}: content hash {actual_id} does not match the recorded checkpoint id "
            f"{recorded_id}: weights or config changed after saving"
        )
    tokenizer.load_state_dict(tensors, strict=True)
    return Checkpoint(tokenizer.to(device).eval(), actual_id, info)
