"""Pre-training on two Ray Train workers (DDP), one of them killed mid-run: Ray restarts the worker
group and it resumes from the last checkpoint, finishing every step once."""

from __future__ import annotations

import os
import signal
import threading
import time

from test_training_lakes import clips_lake

from gr2.training import checkpoint as ckpt
from gr2.training.loop import TrainConfig, plan, train
from gr2.training.metrics import read_metrics, read_metrics_raw

SMALL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vae_n_embd": 32, "vae_n_head": 2, "vae_n_layer": 1, "history": 3}


def kill_a_worker_after_the_first_checkpoint(run_dir: str, done: threading.Event) -> list[int]:
    """SIGKILL rank 0 (its pid is in the metrics log) once step 3's checkpoint is complete."""
    killed: list[int] = []

    def watch() -> None:
        while not done.is_set():
            if os.path.exists(os.path.join(run_dir, "step-000003", "config.json")):
                starts = [r for r in read_metrics_raw(os.path.join(run_dir, "metrics.jsonl")) if r.get("event") == "start"]
                os.kill(starts[-1]["pid"], signal.SIGKILL)
                killed.append(starts[-1]["pid"])
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_metrics_line_torn_by_a_kill_loses_only_itself(tmp_path):
    from gr2.training.metrics import MetricsLog

    log = MetricsLog(str(tmp_path))
    for step in (1, 2):
        log.write({"step": step, "loss": 1.0})
    log.flush()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the worker was killed here
    resumed = MetricsLog(str(tmp_path))
    resumed.write({"step": 3, "loss": 0.5})
    resumed.flush()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def test_two_workers_pretrain_and_a_killed_worker_resumes_from_the_last_checkpoint(fresh_ray, tmp_path):
    lake = clips_lake(str(tmp_path / "lake"), clips=10, frames=5)
    # slow enough per step that the kill lands mid-run: a full model over 8-frame windows
    config = TrainConfig(stage="pretrain", model=SMALL, steps=40, batch_size=4, workers=2, checkpoint_every=3,
                         report_every=3, max_failures=1)
    run_dir = plan(lake, config)["run_dir"]
    done = threading.Event()
    killed = kill_a_worker_after_the_first_checkpoint(run_dir, done)
    result = train(lake, config)
    done.set()

    assert killed, "the run ended before a worker could be killed"
    starts = [r for r in read_metrics_raw(os.path.join(run_dir, "metrics.jsonl")) if r.get("event") == "start"]
    assert [s["world"] for s in starts] == [2, 2] and starts[0]["from_step"] == 0 and starts[1]["from_step"] >= 3
    assert starts[1]["checkpoint"].endswith(f"step-{starts[1]['from_step']:06d}")
    assert result.steps == 40 and [r["step"] for r in read_metrics(run_dir)] == list(range(1, 41))
    assert result.unigram_entropy_nats > 3.5  # 64 codes, near uniform
    assert len(ckpt.list_checkpoints(run_dir)) == config.keep_checkpoints
