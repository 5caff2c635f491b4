"""GR-2 checkpoints: safetensors weights and optimizer state plus a JSON config, named by a content hash.

Under the lake, one directory per training run:

    <lake>/models/gr2/<run_id>/
        run.json                what the run is: stage, configs, the data it read, where it started
        metrics.jsonl           one record per step (metrics.py)
        step-000200/            a checkpoint
            model.safetensors       trainable weights; the tied frame head once; never the frozen
                                    CLIP text tower, which config.clip_model/clip_pretrained rebuild
            optimizer.safetensors   AdamW's per-parameter tensors (its param groups: config.json)
            config.json             format, checkpoint_id, model config, tokenizer, step, stats, ...

The format is the tokenizer's (gr2.tokenizers.checkpoint: its content hash, its writer and readers,
its CheckpointError). config.json is written last, so a save killed half-way leaves a directory
without it, which resuming skips. Nothing is pickled. The checkpoint id hashes the model config and
the weights, so an id names exactly one model whichever run or directory holds it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, NamedTuple

import torch

from gr2.lake.lake import Lake
from gr2.lake.uri import glob, join, url_to_fs
from gr2.tokenizers.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    content_id,
    read_json,
    read_tensors,
    write_checkpoint,
)
from gr2.training.model import GR2, GR2Config
from gr2.training.text import text_encoder_for

FORMAT = "gr2.model/1"
OPTIMIZER = "optimizer.safetensors"
TIED = "frame_head.weight"  # the token embedding's weight (model.py); saved once, as tok_emb.weight
FROZEN = "text_encoder."


class Loaded(NamedTuple):
    model: GR2
    meta: dict[str, Any]  # config.json: checkpoint_id, step, tokenizer_id, stats, data, ...
    optimizer_state: dict | None  # for torch.optim.Optimizer.load_state_dict


def _fs(path: str):
    return url_to_fs(str(path))


def trainable_state(model: GR2) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: every tensor but the frozen text tower and the tied head."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(FROZEN) and k != TIED}


def _checkpoint_id(config: GR2Config, tensors: dict[str, torch.Tensor]) -> str:
    """The checkpoint id of a model of `config` holding `tensors` (its trainable state)."""
    return content_id(json.dumps(dataclasses.asdict(config), sort_keys=True), tensors)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": torch.as_tensor(v).detach().cpu().contiguous()
               for i, s in sd["state"].items() for k, v in s.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = t
    return {"state": state, "param_groups": [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
                                             for g in groups]}


def save_checkpoint(model: GR2, directory: str, optimizer: torch.optim.Optimizer | None = None,
                    meta: dict[str, Any] | None = None) -> str:
    """Write `model` (and `optimizer`) into `directory`; returns the checkpoint id.

    meta: JSON-serialisable facts stored beside the weights (step, stage, tokenizer_id, stats, ...)."""
    state = trainable_state(model)
    cid = _checkpoint_id(model.config, state)
    files = {WEIGHTS: (state, {"checkpoint_id": cid, "format": FORMAT})}
    groups = None
    if optimizer is not None:
        tensors, groups = _optimizer_tensors(optimizer)
        files[OPTIMIZER] = (tensors, {"checkpoint_id": cid})
    config = {"format": FORMAT, "checkpoint_id": cid, "model": dataclasses.asdict(model.config), "saved_at": time.time(),
              "optimizer_param_groups": groups, **(meta or {})}
    write_checkpoint(directory, files, config)
    return cid


def read_meta(directory: str) -> dict[str, Any]:
    """A checkpoint's config.json, checked to be one."""
    return read_json(directory, FORMAT)[1]


def load_checkpoint(directory: str, device: str | torch.device = "cpu", with_optimizer: bool = False,
                    text_encoder=None) -> Loaded:
    """The model saved in `directory` (eval mode), verified against its recorded id.

    text_encoder: a built text tower to share; else the one its config names is built."""
    meta = read_meta(directory)
    config = GR2Config(**meta["model"])
    tensors = read_tensors(directory, WEIGHTS)
    if _checkpoint_id(config, tensors) != meta["checkpoint_id"]:
        raise CheckpointError(f"{directory}: weights do not hash to the recorded id {meta['checkpoint_id']}: "
                              f"changed after saving")
    model = GR2(config, text_encoder=text_encoder or text_encoder_for(config))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != TIED and not k.startswith(FROZEN)]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: does not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    optimizer_state = None
    if with_optimizer and meta.get("optimizer_param_groups") is not None:
        optimizer_state = _optimizer_state(read_tensors(directory, OPTIMIZER), meta["optimizer_param_groups"])
    return Loaded(model.to(device).eval(), meta, optimizer_state)


def init_from(model: GR2, directory: str) -> dict[str, list[str]]:
    """Start `model` from the weights in `directory` where they fit (fine-tuning from pre-training).

    Same-shaped tensors are copied; per-view and per-step embeddings copy the rows both have (a
    one-view pre-training seeds a two-view model's first view). The token embedding, grid
    positions and trunk must match exactly: tokens of another tokenizer mean nothing to this model.
    State and action layers that do not fit (pre-training never trained them) keep their init.
    Returns {"copied": [...], "partial": [...], "skipped": [...]}."""
    meta = read_meta(directory)
    source = read_tensors(directory, WEIGHTS)
    target = model.state_dict()
    report: dict[str, list[str]] = {"copied": [], "partial": [], "skipped": []}
    with torch.no_grad():
        for name, value in source.items():
            if name not in target:
                report["skipped"].append(name)
                continue
            dest = target[name]
            if dest.shape == value.shape:
                dest.copy_(value)
                report["copied"].append(name)
            elif name in ("view_emb", "step_emb") and dest.shape[1:] == value.shape[1:]:
                n = min(dest.shape[0], value.shape[0])
                dest[:n].copy_(value[:n])
                report["partial"].append(name)
            elif name.startswith(("state_", "action_head.")):
                report["skipped"].append(name)
            else:
                raise CheckpointError(
                    f"checkpoint {meta['checkpoint_id']} ({directory}) does not fit this model: {name} is "
                    f"{tuple(value.shape)} there, {tuple(dest.shape)} here (codebook {meta['model']['codebook_size']} "
                    f"vs {model.config.codebook_size}, grid {meta['model']['grid_h']}x{meta['model']['grid_w']} "
                    f"vs {model.config.grid_h}x{model.config.grid_w})")
    return report


def text_model_name(text: dict | None) -> str:
    """A checkpoint's or a lake's text model for people: "ViT-B-32 weights 'none' (512-d)"."""
    if not text or not text.get("model"):
        return "no text model"
    return f"{text['model']} weights {text['pretrained']!r} ({text['dim']}-d)"


def check_text_model(meta: dict, text: dict, lake: str) -> None:
    """Raise CheckpointError when the checkpoint learned from another text model's embeddings than
    `lake`'s: the same instruction would reach it as a vector it never saw."""
    mine = meta.get("text")
    if not mine or not mine.get("model") or not text.get("model"):
        return  # trained without text, or a lake without text: nothing to mismatch
    if (mine["model"], mine["pretrained"], mine["dim"]) != (text["model"], text["pretrained"], text["dim"]):
        raise CheckpointError(
            f"checkpoint {meta['checkpoint_id']} was trained on text embeddings of {text_model_name(mine)}, but lake "
            f"{lake} holds embeddings of {text_model_name(text)}: re-embed the lake with the checkpoint's text model")


# -- finding checkpoints ------------------------------------------------------------------------


def list_checkpoints(run_dir: str) -> list[str]:
    """The complete checkpoints of a run (those with a config.json), oldest step first."""
    return [c.rsplit("/", 1)[0] for c in glob(join(run_dir, "step-*", CONFIG))]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(lake_root: str, ref: str | None = None, stage: str | None = None) -> str:
    """The directory of checkpoint `ref`: a directory, a checkpoint id (or a unique prefix of one), or
    None for the latest saved (of `stage`, when given)."""
    if ref is not None:
        fs, root = _fs(ref)
        if fs.exists(join(root, CONFIG)):
            return ref
    lake = Lake(lake_root)
    where = lake.models_dir("gr2")
    if ref is None:
        found = [s for s in lake.checkpoints("gr2") if stage is None or s.meta.get("stage") == stage]
        if not found:
            raise CheckpointError(f"lake {lake_root} has no GR-2 checkpoint{f' of stage {stage}' if stage else ''} "
                                  f"under {where}: train one first")
        return found[-1].path
    path = lake.find_checkpoint("gr2", ref)
    if path is None:
        raise CheckpointError(f"no checkpoint {ref!r}: not a checkpoint directory, nor an id under {where}")
    return path


def prune(run_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of a run."""
    fs, _ = _fs(run_dir)
    for directory in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        fs.rm(_fs(directory)[1], recursive=True)
