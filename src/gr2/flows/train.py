"""Training flows: `train` (pre-train on clips or fine-tune on robot steps, through Ray Train) and
`evaluate`; and the `gr2 train` / `gr2 evaluate` commands."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from gr2.progress import Progress
from gr2.training.evaluate import EvalConfig
from gr2.training.loop import TrainConfig

LOGGED = ("loss", "loss_image", "token_accuracy", "loss_arm", "loss_gripper", "loss_kl", "action_l1",
          "gripper_accuracy", "samples_per_s", "tokens_per_s", "lr")


def _fmt(record: dict) -> str:
    return " ".join(f"{k}={record[k]:.4g}" for k in LOGGED if k in record)


def curve_rows(records: list[dict], rows: int = 200) -> list[dict]:
    """At most `rows` evenly spaced step records (always the last), rounded for a table artifact."""
    if not records:
        return []
    stride = max(1, len(records) // rows)
    picked = records[::stride] + ([records[-1]] if (len(records) - 1) % stride else [])
    return [{"step": r["step"], **{k: round(r[k], 5) for k in LOGGED if k in r}} for r in picked]


def train_markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [f"### {result['stage']} run `{result['run_id']}`", "",
             f"checkpoint `{result['checkpoint_id']}` at step {result['steps']} ({result['checkpoint']})", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {m[k]:.4g} |" for k in LOGGED if k in m]
    if result.get("unigram_entropy_nats") is not None:
        lines.append(f"| unigram entropy of the tokens (nats) | {result['unigram_entropy_nats']:.4g} |")
    lines += [f"| resumed from step | {result['resumed_from']} |", f"| workers | {result['workers']} |",
              f"| wall time (s) | {result['seconds']:.0f} |"]
    return "\n".join(lines) + "\n"


@flow(name="train-gr2", log_prints=True)
def train(lake: str, stage: Literal["pretrain", "finetune"] = "pretrain", config: TrainConfig = TrainConfig()) -> dict:
    """Train a GR-2 style model on `lake` (resuming the same run if it was cut short)."""
    from gr2.flows.runtime import ensure_ray
    from gr2.training.loop import train as run_training
    from gr2.training.metrics import read_metrics

    config = config.model_copy(update={"stage": stage}) if config.stage != stage else config
    logger = get_run_logger()
    ensure_ray()

    bar = Progress(config.steps, f"train {stage}", "step")

    def progress(record: dict) -> None:
        if record.get("event") == "start":
            logger.info(f"workers started ({record['world']}) from step {record['from_step']}")
            bar.update(record["from_step"] - bar.done)
        elif "step" in record:
            bar.update(record["step"] - bar.done)
            if record["step"] % config.report_every == 0 or record["step"] == config.steps:
                logger.info(f"step {record['step']}/{config.steps}: {_fmt(record)}")

    try:
        result = run_training(lake, config, progress=progress).to_dict()
    finally:
        bar.close()
    create_table_artifact(key=f"{stage}-loss-curve", table=curve_rows(read_metrics(result["run_dir"])),
                          description=f"per-step metrics of {result['run_id']}")
    create_markdown_artifact(key=f"{stage}-run", markdown=train_markdown(result),
                             description=f"{stage} run {result['run_id']}")
    return result


def eval_markdown(result: dict) -> str:
    lines = [f"### Evaluation of `{result['checkpoint_id']}` ({result['stage']}, step {result['step']})", "",
             "| held out | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in result["heldout"].items()]
    if result.get("unigram_entropy_nats") is not None:
        lines.append(f"| unigram entropy (nats) | {result['unigram_entropy_nats']:.4g} |")
    loop = result.get("closed_loop")
    if loop:
        lines += ["", f"**{loop['env_name']}: {loop['successes']}/{loop['episodes']} episodes succeeded "
                      f"({loop['success_rate']:.0%})**, seeds {loop['seeds'][0]}..{loop['seeds'][-1]}", ""]
        lines += [f"- video: {v}" for v in loop["videos"]]
    lines += ["", f"next frames (context | predicted | truth): {result['next_frames_png']}"]
    return "\n".join(lines) + "\n"


@flow(name="evaluate-gr2", log_prints=True)
def evaluate(lake: str, checkpoint: str | None = None, config: EvalConfig = EvalConfig()) -> dict:
    """Held-out metrics, a next-frame picture and, for fine-tuned models, closed-loop Meta-World success."""
    from gr2.training.evaluate import evaluate as run_evaluation

    result = run_evaluation(lake, checkpoint, config)
    create_markdown_artifact(key="gr2-evaluation", markdown=eval_markdown(result),
                             description=f"evaluation of {result['checkpoint_id']}")
    get_run_logger().info(eval_markdown(result))
    return result


def demo(lake: str, steps: int = 30, episodes: int = 2) -> str:
    """`make demo`'s last act: a short pre-training (when the clips carry tokens), a fine-tuning
    started from it, and the evaluation; returns what to print."""
    from gr2.lake.lake import Lake
    from gr2.training.data import TrainingDataError, plan_data

    small = {"history": 2, "n_layer": 2}
    parts, init = [], None
    try:
        plan_data(Lake(lake), "pretrain", 2, 0)
    except TrainingDataError as e:
        parts.append(f"pre-training skipped: {e}\n")
    else:
        pre = train(lake=lake, stage="pretrain", config=TrainConfig(model=small, steps=steps, batch_size=8,
                                                                     checkpoint_every=steps, warmup_steps=5))
        parts.append(train_markdown(pre))
        init = pre["checkpoint"]
    fine = train(lake=lake, stage="finetune", config=TrainConfig(model=small, steps=steps, batch_size=8, init=init,
                                                                  checkpoint_every=steps, warmup_steps=5))
    parts.append(train_markdown(fine))
    result = evaluate(lake=lake, checkpoint=fine["checkpoint"], config=EvalConfig(episodes=episodes, max_steps=100,
                                                                                    videos=1))
    parts.append(eval_markdown(result))
    return "\n".join(parts)
