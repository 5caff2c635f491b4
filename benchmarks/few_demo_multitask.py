"""Does video pre-training from the lake make few robot demos go further? GR-2's claim, in miniature.

One language-conditioned policy learns several Meta-World v3 tasks from 5 or 10 expert demos per
task. Three arms get the same demos and the same fine-tuning budget:
  scratch-stride5    a tiny GR-2 fine-tuned from random weights;
  pretrained-stride5 the same, started from a tiny GR-2 pre-trained (next-frame tokens only) on the lake's video;
  cnn                a plain CNN behaviour-cloned on the same demos (DESIGN.md's calibration baseline).
The GR-2 arms' history frames are --strides steps apart (5: 1/16 s, as the clips' frames are), so
fine-tuning's next frame is one the camera has moved to; `--strides 1 5` adds the first design's
pair, whose history frames were consecutive 80 Hz steps and mostly the same picture (README).

Everything goes through the project's own stages and flows:
  record   expert demos (gr2.sim.record), two cameras with their own clocks, 5 per task per block;
           action-free video of the same tasks and others on other seeds (one camera), as mp4 files
           with their instruction as the caption in a manifest
  build    `build_video_dataset` (the Prefect flow behind `gr2 build-videos`): cuts, gates, clips,
           caption embeddings, near-duplicates, over that video and the demo's real footage
  tokenize a VQ tokenizer trained on robot and web frames (train_floor.py's), then the build's
           tokenize stage (gr2.video.tokenize) over the clips
  ingest   `ingest_robot_trajectories` (the flow behind `gr2 ingest-robot`): aligned, tokenized steps
  train    gr2.training.loop.train through Ray Train: pre-training on clips, fine-tuning on steps
  evaluate closed-loop success on unseen seeds in Ray tasks, two per policy, in parallel, each
           playing a task's seeds side by side (one batched forward pass a step);
           next-frame token accuracy and predicted-vs-true frame strips on held-out episodes

No actions reach pre-training: the video lake holds clips and captions only. Every phase writes
under --work in a directory named by a hash of what shaped it, and is skipped when finished, so a
killed run resumes. Results: benchmarks/results/few_demo_multitask.json and PNGs beside it.

    .venv/bin/python benchmarks/few_demo_multitask.py            # the default run (~93 min on this 2-core machine)
    .venv/bin/python benchmarks/few_demo_multitask.py --quick    # wiring only, a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

# train_floor.py sits beside this script (python puts the script's directory on the path)
from train_floor import spent, tokenizer_phase

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "few_demo_multitask.json"
# Six of MT10 whose scripted experts succeed on every seed tried (drawer-open, reach, push, door-open,
# drawer-close, button-press-topdown), and two more whose video only pre-training sees.
TASKS = ("reach-v3", "push-v3", "drawer-open-v3", "drawer-close-v3", "door-open-v3", "button-press-topdown-v3")
VIDEO_ONLY_TASKS = ("window-open-v3", "window-close-v3")
CAMERAS = ("corner", "gripperPOV")
STATE_DIMS = (0, 1, 2, 7)  # hand xyz and gripper opening: what Meta-World's observation gives the policy
BLOCK_SEED = 0  # demo block b records seeds from (BLOCK_SEED + b) * 100_003 (gr2.sim.record)
VIDEO_SEED = 50
HELDOUT_SEED = 90
FINGERPRINT_MAX_BITS = 1.0  # the video build's near-duplicate threshold (build_video_lake)
EVAL_SEED = 50_000  # evaluation seeds EVAL_SEED..: far from every recording's (block b: b * 100_003 + ...)


# -- phases, cached by content id ------------------------------------------------------------------


def content_id(**shaping) -> str:
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:10]


PHASE_SECONDS: dict[str, float] = {}  # every phase this invocation used, run now or earlier: what a cold run costs


def phase_directory(work: str, name: str, shaping: dict) -> str:
    return os.path.join(work, f"{name}-{content_id(name=name, **shaping)}")


def phase_done(work: str, name: str, shaping: dict) -> bool:
    return os.path.exists(os.path.join(phase_directory(work, name, shaping), "result.json"))


def phase(work: str, name: str, shaping: dict, run) -> dict:
    """run(directory) -> result, once per content: a finished phase's result.json is read back."""
    directory = phase_directory(work, name, shaping)
    done = os.path.join(directory, "result.json")
    if os.path.exists(done):
        result = json.loads(Path(done).read_text())
        PHASE_SECONDS[os.path.basename(directory)] = result["seconds"]
        return result
    os.makedirs(directory, exist_ok=True)
    t = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    result = {**run(directory), "directory": directory, "seconds": round(time.perf_counter() - t, 1)}
    Path(done).write_text(json.dumps(result, indent=1, default=str))
    PHASE_SECONDS[os.path.basename(directory)] = result["seconds"]
    print(f"[{time.strftime('%H:%M:%S')}] {name} done in {result['seconds']:.0f}s", flush=True)
    return result


def record_block(directory: str, tasks: tuple[str, ...], episodes: int, seed: int, cameras=None, size: int = 64) -> dict:
    """`episodes` expert episodes per task at size x size into a LeRobot dataset, directory/<its name>."""
    from gr2.sim.record import RecordConfig, record

    config = RecordConfig(tasks=tasks, episodes=episodes, seed=seed, width=size, height=size)
    if cameras is not None:
        config = dataclasses.replace(config, cameras=cameras)
    out = os.path.join(directory, os.path.basename(directory))  # the lake's `dataset` is this name
    if os.path.exists(out):
        shutil.rmtree(out)  # a half-written recording of a killed run
    record(out, config)
    return {"dataset": out, "name": os.path.basename(out), "episodes": episodes * len(tasks)}


def video_manifest(dataset: str, path: str) -> int:
    """A manifest of a recording's corner-camera mp4s, each captioned with its episode's instruction."""
    from gr2.sim.record import VIDEO_PATH

    rows = []
    with open(os.path.join(dataset, "meta", "episodes.jsonl")) as f:
        for line in f:
            episode = json.loads(line)
            index = episode["episode_index"]
            video = VIDEO_PATH.format(episode_chunk=index // 1000, episode_index=index,
                                      video_key="observation.images.corner")
            rows.append({"uri": os.path.join(dataset, video), "caption": episode["tasks"][0], "dataset": "metaworld-video"})
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


def build_video_lake(directory: str, manifest: str, tokenizer: str, real_footage: bool) -> dict:
    """The action-free video through the build flow (cuts, gates, clips, caption embeddings, near-dup),
    then tokenized by the build's tokenize stage with the shared tokenizer."""
    from gr2.flows.build import build_video_dataset
    from gr2.flows.demo import demo_sources
    from gr2.lake.lake import Lake
    from gr2.video.config import BuildConfig
    from gr2.video.tokenize import tokenize_lake

    root = os.path.join(directory, "lake")
    # A Meta-World episode lasts about a second (80 Hz control): half-second clips of 8 frames, and
    # videos from half a second up are kept (the default gate asks for one). Episodes of one task on
    # other seeds share the scene and differ in object positions and the arm's path: at the default
    # 8 bits the weight-free near-duplicate check called 119 of 133 such clips copies of another, so
    # this build takes only near-exact copies (1 bit) as duplicates.
    config = BuildConfig(clip_s=0.5, min_clip_s=0.4, min_duration_s=0.5, frames_per_clip=8, caption_model=None,
                         fingerprint_max_bits=FINGERPRINT_MAX_BITS)
    sources = [manifest, *(demo_sources() if real_footage else [])]
    funnel = build_video_dataset(sources=sources, lake=root, config=config)["funnel"]
    copy = os.path.join(root, "models", "tokenizers", os.path.basename(tokenizer))
    if not os.path.exists(copy):
        shutil.copytree(tokenizer, copy)
    tokenized = tokenize_lake(Lake(root), copy).to_dict()
    clips = Lake(root).read("clips", columns=["status", "caption", "uri"], filter="tokens IS NOT NULL").to_pylist()
    covered = {}
    for c in clips:
        covered[c["caption"] or "(no caption)"] = covered.get(c["caption"] or "(no caption)", 0) + 1
    return {"lake": root, "funnel": funnel, "tokenize": {k: v for k, v in tokenized.items() if k != "failures"},
            "tokenized_clips_by_caption": covered}


def ingest_demos(directory: str, datasets: list[str], tokenizer: str) -> dict:
    from gr2.flows.robot import ingest_robot_trajectories
    from gr2.robot.ingest import IngestConfig

    root = os.path.join(directory, "lake")
    config = IngestConfig(tokenizer=tokenizer, frame_width=64, frame_height=64, concurrency=2)
    funnel = ingest_robot_trajectories(sources=datasets, lake=root, config=config)["funnel"]
    copy = os.path.join(root, "models", "tokenizers", os.path.basename(tokenizer))
    if not os.path.exists(copy):
        shutil.copytree(tokenizer, copy)
    return {"lake": root, "funnel": funnel}


def where_demos(blocks: list[str]) -> str:
    return "dataset IN (" + ", ".join(f"'{b}'" for b in blocks) + ")"


def finetune_config(args, blocks: list[str], seed: int, init: str | None = None, frame_stride: int = 1):
    from gr2.training.data import DataConfig
    from gr2.training.loop import TrainConfig

    # holdout 0: the held-out episodes are a dataset of their own, so each arm trains on every demo
    return TrainConfig(
        stage="finetune", size="tiny", model={"n_views": len(CAMERAS), "history": 2}, init=init, seed=seed,
        data=DataConfig(cameras=CAMERAS, state_dims=STATE_DIMS, action_column="source_action", holdout=0.0,
                        episodes=where_demos(blocks), frame_stride=frame_stride),
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(100, args.steps // 10),
        workers=1, cpus_per_worker=args.train_cpus, checkpoint_every=max(args.steps // 2, 1),
        report_every=max(args.steps // 20, 1))


def pretrain(args, video_lake: str) -> dict:
    from gr2.training.loop import TrainConfig, train

    # n_views as fine-tuning's, so every weight carries over; a clip fills view 0, the corner camera's
    config = TrainConfig(stage="pretrain", size="tiny", model={"n_views": len(CAMERAS), "history": 2},
                         steps=args.pretrain_steps, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=min(100, args.pretrain_steps // 10), workers=1, cpus_per_worker=args.train_cpus,
                         checkpoint_every=max(args.pretrain_steps // 2, 1), report_every=max(args.pretrain_steps // 20, 1))
    run = train(video_lake, config)
    return {**run.to_dict(), **spent(run.run_dir)}


# -- the plain CNN baseline -----------------------------------------------------------------------


def plain_cnn(n_cameras: int, state_dim: int, text_dim: int, action_dim: int):
    """DESIGN.md's calibration policy, made multi-task: three conv layers per camera (shared weights),
    the state and the instruction's stored embedding, an MLP to the action."""
    import torch
    from torch import nn

    class PlainCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 32, 5, 2), nn.ReLU(), nn.Conv2d(32, 64, 3, 2), nn.ReLU(),
                                      nn.Conv2d(64, 64, 3, 2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(128), nn.ReLU())
            self.text = nn.Linear(text_dim, 64)
            self.head = nn.Sequential(nn.Linear(128 * n_cameras + state_dim + 64, 256), nn.ReLU(),
                                      nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, action_dim))

        def forward(self, images, state, text):  # images (B, V, 3, H, W) in [0, 1]
            B, V = images.shape[:2]
            seen = self.conv(images.flatten(0, 1)).reshape(B, -1)
            return self.head(torch.cat([seen, state, self.text(text)], dim=1))

    return PlainCNN()


def demo_steps(lake_root: str, where: str) -> dict[str, np.ndarray]:
    """Every step of the chosen demos with all views present: images, state, action, instruction embedding."""
    import io

    from PIL import Image

    from gr2.lake.lake import Lake
    from gr2.lake.query import sql_literal

    lake = Lake(lake_root)
    episodes = lake.read("episodes", columns=["episode_id", "instruction", "instruction_embedding"],
                         filter=f"({where}) AND status = 'accepted'").to_pylist()
    text = {e["episode_id"]: np.asarray(e["instruction_embedding"], np.float32) for e in episodes}
    steps = lake.read("steps", columns=["episode_id", "state", "source_action", "views"],
                      filter=f"episode_id IN ({', '.join(sql_literal(e) for e in text)})").to_pylist()
    out = {"images": [], "state": [], "action": [], "text": []}
    for s in steps:
        views = {v["camera"]: v for v in s["views"]}
        if s["source_action"] is None or not all(views.get(c) and views[c]["ok"] for c in CAMERAS):
            continue
        out["images"].append(np.stack([np.asarray(Image.open(io.BytesIO(views[c]["jpeg"])).convert("RGB"))
                                       for c in CAMERAS]))
        out["state"].append(np.asarray(s["state"], np.float32)[list(STATE_DIMS)])
        out["action"].append(np.asarray(s["source_action"], np.float32))
        out["text"].append(text[s["episode_id"]])
    return {k: np.stack(v) for k, v in out.items()} | {"instructions": {e["instruction"]: text[e["episode_id"]].tolist()
                                                                        for e in episodes}}


def train_cnn(directory: str, lake_root: str, blocks: list[str], steps: int, seed: int, threads: int) -> dict:
    """Behaviour cloning, MSE on the recorded 4-d command, Adam; saves cnn.pt beside its statistics."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    data = demo_steps(lake_root, where_demos(blocks))
    mean, std = data["state"].mean(0), data["state"].std(0) + 1e-6
    model = plain_cnn(len(CAMERAS), len(STATE_DIMS), data["text"].shape[1], data["action"].shape[1])
    images = torch.as_tensor(data["images"]).permute(0, 1, 4, 2, 3)  # uint8, (N, V, 3, H, W)
    state = torch.as_tensor((data["state"] - mean) / std)
    action, text = torch.as_tensor(data["action"]), torch.as_tensor(data["text"])
    model(images[:2].float() / 255, state[:2], text[:2])  # sizes the lazy layer
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    losses, t = [], time.process_time()
    for _ in range(steps):
        i = torch.as_tensor(rng.integers(0, len(state), 64))
        loss = torch.nn.functional.mse_loss(model(images[i].float() / 255, state[i], text[i]), action[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    path = os.path.join(directory, "cnn.pt")
    # tensors and plain values only, so CNNPolicy loads it with weights_only=True (no code runs on load)
    torch.save({"weights": model.state_dict(), "state_mean": torch.as_tensor(mean), "state_std": torch.as_tensor(std),
                "instructions": data["instructions"], "dims": [len(STATE_DIMS), data["text"].shape[1], data["action"].shape[1]]},
               path)
    return {"checkpoint": path, "samples": len(state), "loss_first_50": float(np.mean(losses[:50])),
            "loss_last_50": float(np.mean(losses[-50:])), "cpu_minutes": round((time.process_time() - t) / 60, 1)}


class CNNPolicy:
    """The plain CNN acting in Meta-World (gr2.sim.env.BatchPolicy): frames as the recorder stores them."""

    def __init__(self, path: str, instruction: str):
        import torch

        saved = torch.load(path, weights_only=True)
        state_dim, text_dim, action_dim = saved["dims"]
        self.model = plain_cnn(len(CAMERAS), state_dim, text_dim, action_dim)
        self.model(torch.zeros(1, len(CAMERAS), 3, 64, 64), torch.zeros(1, state_dim), torch.zeros(1, text_dim))
        self.model.load_state_dict(saved["weights"])
        self.model.eval()
        self.mean, self.std = saved["state_mean"].numpy(), saved["state_std"].numpy()
        self.text = torch.as_tensor(np.asarray(saved["instructions"][instruction], np.float32))[None]

    def reset(self, episodes: int = 1) -> None:
        pass  # a function of the current observation

    def act(self, observations: dict[int, dict]) -> dict[int, np.ndarray]:
        import torch

        seen = list(observations.values())
        images = np.stack([np.stack([o[f"observation.images.{c}"][::-1] for c in CAMERAS]) for o in seen])  # upright
        state = (np.stack([o["observation.state"] for o in seen]) - self.mean) / self.std
        with torch.no_grad():
            actions = self.model(torch.as_tensor(images.copy()).permute(0, 1, 4, 2, 3).float() / 255,
                                 torch.as_tensor(state, dtype=torch.float32), self.text.expand(len(seen), -1)).numpy()
        return {i: np.clip(a, -1.0, 1.0) for i, a in zip(observations, actions)}


# -- evaluation -----------------------------------------------------------------------------------


def rollouts(arm: str, checkpoint: str, tokenizer: str, lake: str, tasks: list[str], seeds: list[int], max_steps: int,
             replan_every: int) -> dict[str, list[dict]]:
    """One policy on some tasks' seeds, in this (Ray worker) process; torch gets one thread."""
    import torch
    import torch._dynamo  # noqa: F401  (before MuJoCo's osmesa: gr2.sim.env)

    from gr2.sim.env import RolloutConfig, run_rollouts
    from gr2.sim.record import INSTRUCTIONS
    from gr2.training.evaluate import MetaWorldPolicy

    torch.set_num_threads(1)
    out = {}
    for task in tasks:
        instruction = INSTRUCTIONS[task]
        policy = (CNNPolicy(checkpoint, instruction) if arm == "cnn" else
                  MetaWorldPolicy(checkpoint, tokenizer, instruction, replan_every, threads=1, lake=lake))
        config = RolloutConfig(env_name=task, seeds=tuple(seeds), cameras=CAMERAS, image_size=64, max_steps=max_steps,
                               lockstep=len(seeds))
        out[task] = [{"seed": e.seed, "success": e.success, "steps": e.steps} for e in run_rollouts(policy, config).episodes]
    return out


def closed_loop(args, work: str, policies: dict[str, dict], tokenizer: str, lake: str) -> dict[str, dict]:
    """Each policy's tasks in two halves, each half a Ray task of one CPU, every policy's in flight at
    once; each policy's result is a phase of its own (a killed run keeps the finished ones):
    {policy: {task: episodes}}. Workers are reused: a fresh one costs seconds of imports."""
    import ray

    # a worker holds torch, the policy and --eval-seeds live environments (~100 MB each: gr2.sim.env)
    remote = ray.remote(num_cpus=1, memory=(1536 + 100 * args.eval_seeds) * 2**20)(rollouts)
    seeds = list(range(EVAL_SEED, EVAL_SEED + args.eval_seeds))
    middle = (len(args.tasks) + 1) // 2
    halves = [half for half in (list(args.tasks[:middle]), list(args.tasks[middle:])) if half]
    shaping = {name: {"policy": p["checkpoint"], "tasks": args.tasks, "seeds": args.eval_seeds,
                      "max_steps": args.max_steps, "replan": args.replan_every} for name, p in policies.items()}
    futures = {name: [remote.remote(p["arm"], p["checkpoint"], tokenizer, lake, half, seeds, args.max_steps,
                                    args.replan_every) for half in halves]
               for name, p in policies.items() if not phase_done(work, "closed-loop", shaping[name])}

    def gather(name: str) -> dict:
        episodes: dict = {}
        for part in ray.get(futures[name]):
            episodes.update(part)
        return {"episodes": episodes}

    return {name: phase(work, "closed-loop", shaping[name], lambda d, name=name: gather(name))["episodes"]
            for name in policies}


def video_prediction(lake_root: str, checkpoint: str, heldout: str, png: str) -> dict:
    """Next-frame token accuracy and loss on the held-out episodes, and a strip of predicted vs true frames."""
    from gr2.lake.lake import Lake
    from gr2.training import checkpoint as ckpt
    from gr2.training.data import DataConfig, plan_data
    from gr2.training.evaluate import EvalConfig, heldout_metrics, load_tokenizer, next_frame_picture

    loaded = ckpt.load_checkpoint(checkpoint)
    meta = loaded.meta
    tokenizer, tokenizer_path = load_tokenizer(meta, lake_root)
    config = DataConfig(cameras=CAMERAS, state_dims=STATE_DIMS, action_column="source_action", holdout=0.0,
                        episodes=where_demos([heldout]), frame_stride=meta["data"].get("frame_stride", 1))
    spec = plan_data(Lake(lake_root), "finetune", meta["data"]["history"], meta["data"]["chunk"], config, tokenizer_path)
    spec = dataclasses.replace(spec, heldout_ids=spec.train_ids, train_ids=(), stats=meta["stats"])
    metrics = heldout_metrics(loaded.model, spec, EvalConfig(heldout_batches=40))
    next_frame_picture(loaded.model, tokenizer, spec, png, count=4)
    return {**metrics, "copy_token_accuracy": copy_accuracy(spec), "png": png}


def copy_accuracy(spec) -> float:
    """The floor for next-frame token accuracy: predict that every token stays as it is. Steps run at
    80 Hz and the cameras at 20 and 15 fps, so most steps' next frame is the frame they already show
    (with a frame stride, the history frames are further apart and fewer stay the same)."""
    from gr2.training.data import iter_batches

    same = total = 0
    for i, batch in enumerate(iter_batches(spec, 16, split="heldout", epochs=1, shuffle=False)):
        if i >= 40:  # as many batches as heldout_metrics reads
            break
        frames = batch["frames"]
        same += int((frames[:, -1] == frames[:, -2]).sum())
        total += frames[:, -1].numel()
    return same / max(total, 1)


# -- the report -----------------------------------------------------------------------------------


def arm_name(arm: str, stride: int) -> str:
    return arm if stride == 1 else f"{arm}-stride{stride}"


def summarise(evaluations: dict, args) -> dict:
    """Success rate per arm and demo count: per task and overall, mean and std over training seeds."""
    table = {}
    gr2_arms = [arm_name(a, s) for s in args.strides for a in ("scratch", "pretrained")]
    for demos in args.demos:
        for arm in gr2_arms + ["cnn"]:
            runs = [e for e in evaluations.values() if e["arm"] == arm and e["demos"] == demos]
            if not runs:
                continue
            per_task = {t: [np.mean([ep["success"] for ep in r["closed_loop"][t]]) for r in runs] for t in args.tasks}
            overall = [np.mean([per_task[t][i] for t in args.tasks]) for i in range(len(runs))]
            row = {"seeds": len(runs), "overall_mean": float(np.mean(overall)), "overall_std": float(np.std(overall)),
                   "per_task": {t: {"mean": float(np.mean(v)), "std": float(np.std(v))} for t, v in per_task.items()}}
            accuracy = [r["video"]["token_accuracy"] for r in runs if r.get("video")]
            if accuracy:
                row["heldout_token_accuracy_mean"] = float(np.mean(accuracy))
                copy = [r["video"]["copy_token_accuracy"] for r in runs if "copy_token_accuracy" in r.get("video", {})]
                if copy:
                    row["heldout_copy_token_accuracy"] = float(np.mean(copy))
                row["heldout_action_l1_mean"] = float(np.mean([r["video"]["action_l1_units"] for r in runs]))
            table[f"{arm} / {demos} demos"] = row
    return table


def print_table(table: dict, tasks: tuple[str, ...]) -> None:
    short = [t.removesuffix("-v3") for t in tasks]
    print(f"\n{'arm / demos per task':24}{'overall':>14}" + "".join(f"{s[:12]:>14}" for s in short) + f"{'token acc':>11}")
    for name, row in table.items():
        cells = [f"{row['overall_mean']:.2f}±{row['overall_std']:.2f}"] + [
            f"{row['per_task'][t]['mean']:.2f}±{row['per_task'][t]['std']:.2f}" for t in tasks]
        accuracy = row.get("heldout_token_accuracy_mean")
        print(f"{name:24}" + "".join(f"{c:>14}" for c in cells) + (f"{accuracy:>11.3f}" if accuracy is not None else f"{'-':>11}"))


def loss_curves(result: dict, png: str) -> str | None:
    """Why pre-training does or does not carry over, as a picture: pre-training's next-frame loss beside
    its unigram floor, and each GR-2 arm's fine-tuning losses (image and arm) on seed 0 at the fewest demos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gr2.training.metrics import read_metrics

    def curve(checkpoint: str, key: str) -> tuple[list[int], list[float]]:
        records = [r for r in read_metrics(os.path.dirname(checkpoint)) if key in r]
        return [r["step"] for r in records], [r[key] for r in records]

    pre = result["pretrain"]
    demos = min(e["demos"] for e in result["runs"].values())
    drawn = [run for _, run in sorted(result["runs"].items())
             if run["arm"] != "cnn" and run["seed"] == 0 and run["demos"] == demos]
    if not all(os.path.isdir(os.path.dirname(c)) for c in [pre["checkpoint"]] + [r["train"]["checkpoint"]
                                                                                 for r in drawn]):
        return None  # drawn by the run whose checkpoints these are; its work directory is gone (--keep-results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(*curve(pre["checkpoint"], "loss_image"), label="pre-training (clips)")
    if pre.get("unigram_entropy_nats"):
        axes[0].axhline(pre["unigram_entropy_nats"], color="grey", linestyle=":", label="unigram entropy")
    axes[0].set(title="pre-training: next-frame tokens", xlabel="step", ylabel="nats")
    for run in drawn:
        for ax, key in ((axes[1], "loss_image"), (axes[2], "loss_arm")):
            ax.plot(*curve(run["train"]["checkpoint"], key), label=run["arm"])
    axes[1].set(title=f"fine-tuning: next-frame tokens ({demos} demos, seed 0)", xlabel="step", ylabel="nats")
    axes[2].set(title=f"fine-tuning: arm actions ({demos} demos, seed 0)", xlabel="step", ylabel="loss")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def markdown_table(result: dict) -> str:
    """The results as the README quotes them (`--table`): success per arm, per task and overall."""
    tasks = tuple(result["config"]["tasks"])
    lines = ["| arm / demos per task | seeds | overall | " + " | ".join(t.removesuffix("-v3") for t in tasks)
             + " | held-out next-frame token accuracy (copy floor) |", "|---" * (len(tasks) + 4) + "|"]
    for name, row in result["table"].items():
        cells = [f"{row['overall_mean']:.2f} ± {row['overall_std']:.2f}"] + [
            f"{row['per_task'][t]['mean']:.2f} ± {row['per_task'][t]['std']:.2f}" for t in tasks]
        accuracy, floor = row.get("heldout_token_accuracy_mean"), row.get("heldout_copy_token_accuracy")
        video = "-" if accuracy is None else f"{accuracy:.3f}" + (f" ({floor:.3f})" if floor is not None else "")
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + f" | {video} |")
    return "\n".join(lines)


SCHEDULING = ("out", "work", "seeds", "keep_results", "table")  # not the experiment's shape


def expected_runs(args) -> list[str]:
    """Every run the experiment holds."""
    arms = [arm_name(a, s) for s in args.strides for a in ("scratch", "pretrained")] + ["cnn"]
    return [f"{arm}/{d}/{i}" for d in args.demos for i in range(args.seeds) for arm in arms]


def kept_results(args) -> dict:
    """--out's results, when they come from the same experiment (config equal but for what only schedules it)."""
    if not args.out.exists():
        raise SystemExit(f"--keep-results: {args.out} does not exist")
    earlier = json.loads(args.out.read_text())
    ours = {k: v for k, v in vars(args).items() if k not in SCHEDULING}
    theirs = {k: v for k, v in earlier["config"].items() if k not in SCHEDULING}
    differ = sorted(k for k in ours.keys() | theirs.keys()
                    if json.dumps(ours.get(k), default=str) != json.dumps(theirs.get(k), default=str))
    if differ:
        raise SystemExit(f"--keep-results: {args.out} was made with other settings ({', '.join(differ)}); "
                         "its runs would not be comparable")
    return earlier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(HERE.parent / ".few-demo-work"))
    p.add_argument("--quick", action="store_true", help="a wiring check: two tasks, one demo, a few steps; no claim")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--demos", nargs="+", type=int, default=[5, 10], help="demos per task; multiples of --block")
    p.add_argument("--block", type=int, default=5, help="demos per task recorded per block (dataset)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per arm")
    p.add_argument("--video-episodes", type=int, default=10, help="action-free videos per task (and per video-only task)")
    p.add_argument("--no-real-footage", dest="real_footage", action="store_false",
                   help="pre-train on the Meta-World video alone, without the demo's real footage")
    p.add_argument("--heldout-episodes", type=int, default=2, help="held-out episodes per task (video prediction)")
    p.add_argument("--tokenizer-steps", type=int, default=600)
    p.add_argument("--codebook", type=int, default=512)
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps, every GR-2 arm")
    p.add_argument("--cnn-steps", type=int, default=1000)
    p.add_argument("--strides", nargs="+", type=int, default=[5],
                   help="the GR-2 arms' frame strides, a scratch and a pre-trained arm for each: history frames this "
                        "many steps apart (5: 1/16 s, as the clips'; 1: consecutive 80 Hz steps, the first design)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--train-cpus", type=int, default=2)
    p.add_argument("--eval-seeds", type=int, default=10, help="unseen seeds per task")
    p.add_argument("--max-steps", type=int, default=150, help="closed-loop steps before an episode fails")
    p.add_argument("--replan-every", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep-results", action="store_true",
                   help="keep the runs --out already holds (same config) and add only the missing ones: for a run "
                        "whose phase cache was lost; the tokenizer and pre-training it trains anew are recorded "
                        "beside the earlier ones")
    p.add_argument("--table", action="store_true",
                   help="print --out's results as a markdown table and redraw its loss curves, run nothing")
    args = p.parse_args()
    if args.table:
        result = json.loads(args.out.read_text())
        print(markdown_table(result))
        drawn = loss_curves(result, str(args.out.with_suffix("")) + "/loss_curves.png")
        print(drawn or "(loss curves not redrawn: the checkpoints they read are not under --work)")
        return
    if args.quick:
        args.tasks, args.demos, args.block, args.seeds = ["reach-v3", "drawer-close-v3"], [1], 1, 1
        args.video_episodes, args.heldout_episodes, args.tokenizer_steps, args.codebook = 1, 1, 10, 64
        args.pretrain_steps, args.steps, args.cnn_steps, args.batch_size = 4, 4, 4, 8
        args.eval_seeds, args.max_steps, args.real_footage, args.strides = 1, 8, False, [1]
        if args.out == RESULTS:
            args.out = Path(args.work) / "few_demo_multitask.json"
    if any(d % args.block for d in args.demos):
        p.error(f"--demos {args.demos}: each must be a multiple of --block {args.block}")
    args.tasks = tuple(args.tasks)

    import torch._dynamo  # noqa: F401  (before MuJoCo's osmesa loads in this process: DESIGN.md)

    from gr2.flows.runtime import ensure_ray, offline_defaults

    offline_defaults()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    ensure_ray()
    work = args.work
    os.makedirs(work, exist_ok=True)
    started = time.perf_counter()
    command = "benchmarks/few_demo_multitask.py" + (" --quick" if args.quick else "")
    result: dict = {"command": command, "config": {k: v for k, v in vars(args).items()
                                                if k not in ("out", "work", "keep_results", "table")}}
    earlier = kept_results(args) if args.keep_results else None
    if earlier:
        result["runs"] = earlier["runs"]  # from the first save on: a run killed early leaves --out's runs in it

    def save() -> None:
        result["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)  # this invocation's
        # the phases this result rests on, whichever invocation ran them: a cold run's wall time
        result["phase_seconds"] = dict(PHASE_SECONDS)
        result["phase_minutes_total"] = round(sum(PHASE_SECONDS.values()) / 60, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    blocks = [phase(work, f"demos-{b}", {"tasks": args.tasks, "episodes": args.block, "seed": BLOCK_SEED + b},
                    lambda d, b=b: record_block(d, args.tasks, args.block, BLOCK_SEED + b))
              for b in range(max(args.demos) // args.block)]
    heldout = phase(work, "heldout", {"tasks": args.tasks, "episodes": args.heldout_episodes, "seed": HELDOUT_SEED},
                    lambda d: record_block(d, args.tasks, args.heldout_episodes, HELDOUT_SEED))
    from gr2.sim.record import CameraSpec

    video_tasks = args.tasks + tuple(t for t in VIDEO_ONLY_TASKS if t not in args.tasks)
    # 128x128 like web video (the build's resolution gate asks for 96); tokenizing resizes to 64
    video = phase(work, "video", {"tasks": video_tasks, "episodes": args.video_episodes, "seed": VIDEO_SEED, "size": 128},
                  lambda d: record_block(d, video_tasks, args.video_episodes, VIDEO_SEED, (CameraSpec("corner", fps=20.0),),
                                         size=128))
    manifest = os.path.join(video["directory"], "manifest.jsonl")
    result["video_episodes"] = video_manifest(video["dataset"], manifest)
    datasets = [b["dataset"] for b in blocks]

    def make_tokenizer(d: str) -> dict:
        path, info = tokenizer_phase(d, os.path.join(d, "home"), datasets, args.tokenizer_steps, args.codebook)
        return {"path": path, "info": info}

    tokenizer = phase(work, "tokenizer", {"data": datasets, "steps": args.tokenizer_steps, "codebook": args.codebook},
                      make_tokenizer)
    result["tokenizer"] = tokenizer["info"]
    tok = tokenizer["path"]
    video_lake = phase(work, "video-lake", {"manifest": manifest, "tokenizer": tok, "real_footage": args.real_footage,
                                            "fingerprint_max_bits": FINGERPRINT_MAX_BITS},
                       lambda d: build_video_lake(d, manifest, tok, args.real_footage))
    result["video_lake"] = {k: v for k, v in video_lake.items() if k != "lake"}
    robot = phase(work, "robot-lake", {"datasets": datasets + [heldout["dataset"]], "tokenizer": tok},
                  lambda d: ingest_demos(d, datasets + [heldout["dataset"]], tok))
    result["ingest"] = robot["funnel"]
    save()

    pre = phase(work, "pretrain", {"lake": video_lake["lake"], "steps": args.pretrain_steps, "lr": args.lr,
                                   "batch": args.batch_size}, lambda d: pretrain(args, video_lake["lake"]))
    result["pretrain"] = {k: pre[k] for k in ("run_id", "checkpoint", "steps", "metrics", "unigram_entropy_nats",
                                              "minutes", "cpu_minutes")}
    if earlier:
        result["earlier_pipelines"] = earlier.get("earlier_pipelines", [])
        if earlier["pretrain"]["metrics"] != result["pretrain"]["metrics"]:  # trained anew: say which runs used which
            result["earlier_pipelines"].append({**{k: earlier[k] for k in ("tokenizer", "video_lake", "pretrain",
                                                                          "wall_minutes")},
                                                "runs": sorted(earlier["runs"])})
    save()

    from gr2.training.loop import train

    evaluations = result.setdefault("runs", {})
    pngs = HERE / "results" / "few_demo_multitask" if not args.quick else Path(work) / "png"
    pngs.mkdir(parents=True, exist_ok=True)
    def group(demos: int, seed: int) -> None:
        """Fine-tune the GR-2 arms (a scratch and a pre-trained one per stride) and the CNN on `demos`
        demos per task with training seed `seed`; then all their closed loops at once and the held-out
        video metrics."""
        names = [b["name"] for b in blocks[: demos // args.block]]
        arms = [(arm_name(arm, s), init, s) for s in args.strides
                for arm, init in (("scratch", None), ("pretrained", pre["checkpoint"]))]
        if all(f"{arm}/{demos}/{seed}" in evaluations for arm in [a[0] for a in arms] + ["cnn"]):
            return  # kept from --out (--keep-results): nothing to train
        policies = {}
        for arm, init, stride in arms:
            config = finetune_config(args, names, seed, init, stride)
            key = config.model_dump()
            if stride == 1:  # as before the setting existed: finished runs stay cached
                del key["data"]["frame_stride"]

            def fine_tune(d: str, config=config) -> dict:
                run = train(robot["lake"], config)
                return {**run.to_dict(), **spent(run.run_dir)}

            run = phase(work, f"finetune-{arm}", {"lake": robot["lake"], "config": key}, fine_tune)
            policies[f"{arm}/{demos}/{seed}"] = {"arm": arm, "checkpoint": run["checkpoint"], "train": run}
        run = phase(work, "cnn", {"lake": robot["lake"], "demos": names, "steps": args.cnn_steps, "seed": seed},
                    lambda d: train_cnn(d, robot["lake"], names, args.cnn_steps, seed, args.train_cpus))
        policies[f"cnn/{demos}/{seed}"] = {"arm": "cnn", "checkpoint": run["checkpoint"], "train": run}
        todo = {n: p for n, p in policies.items() if n not in evaluations}
        loops = closed_loop(args, work, todo, tok, robot["lake"])
        for name, p in todo.items():
            entry = {"arm": p["arm"], "demos": demos, "seed": seed, "closed_loop": loops[name],
                     "train": {k: p["train"].get(k) for k in ("run_id", "checkpoint", "steps", "minutes", "cpu_minutes",
                                                               "loss_first_50", "loss_last_50", "metrics", "samples")}}
            if p["arm"] != "cnn":
                # seed 0's strips are committed beside the JSON; the other seeds' stay in the work directory
                png = str((pngs if seed == 0 else Path(work)) / f"next_frames-{p['arm']}-{demos}demos-seed{seed}.png")
                entry["video"] = video_prediction(robot["lake"], p["checkpoint"], heldout["name"], png)
            evaluations[name] = entry
        result["table"] = summarise(evaluations, args)
        save()
        print_table(result["table"], args.tasks)

    for demos in args.demos:
        for seed in range(args.seeds):
            group(demos, seed)
    result["table"] = summarise(evaluations, args)  # kept runs too, when no group ran (--keep-results)
    result["loss_curves"] = loss_curves(result, str(pngs / "loss_curves.png"))
    result["missing_runs"] = [n for n in expected_runs(args) if n not in evaluations]
    save()
    print(f"wrote {args.out} ({result['wall_minutes']} min)")


if __name__ == "__main__":
    main()
