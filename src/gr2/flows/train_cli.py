"""`gr2 train`, `gr2 evaluate`: the GR-2 model from the command line."""

from __future__ import annotations

import json

from gr2.flows.options import read_settings


def load_train_config(path: str | None, overrides: dict):
    """A TrainConfig from a YAML/JSON file of its fields, with the command line's settings on top."""
    from gr2.training.loop import TrainConfig

    data = read_settings(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**data)


def train_command(args) -> str:
    from gr2.flows.train import train, train_markdown

    config = load_train_config(args.config, {"stage": args.stage, "init": args.init, "workers": args.workers,
                                             "steps": args.steps, "batch_size": args.batch_size, "size": args.size,
                                             "use_gpu": args.gpu or None})
    if args.where:
        config = config.model_copy(update={"data": config.data.model_copy(update={"episodes": args.where})})
    result = train(lake=args.lake, stage=args.stage, config=config)
    return json.dumps(result, indent=2, default=str) if args.json else train_markdown(result)


def evaluate_command(args) -> str:
    from gr2.flows.train import eval_markdown, evaluate
    from gr2.training.evaluate import EvalConfig

    overrides = {k: v for k, v in {"episodes": args.episodes, "env_name": args.env, "videos": args.videos,
                                   "max_steps": args.max_steps, "first_seed": args.first_seed}.items() if v is not None}
    result = evaluate(lake=args.lake, checkpoint=args.checkpoint, config=EvalConfig(**overrides))
    return json.dumps(result, indent=2, default=str) if args.json else eval_markdown(result)


def register(sub) -> None:
    p = sub.add_parser("train", help="pre-train (clips) or fine-tune (robot steps) a GR-2 style model on Ray Train")
    p.add_argument("--lake", required=True, help="lake root: a directory or s3://bucket/prefix")
    p.add_argument("--stage", required=True, choices=("pretrain", "finetune"))
    p.add_argument("--init", metavar="CHECKPOINT", help="checkpoint id or directory to start from")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, help="global batch, split over the workers (default 32)")
    p.add_argument("--size", choices=("tiny", "S", "B"), help="model size (default tiny)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    p.add_argument("--where", help="fine-tuning: SQL over episodes, which to train on (e.g. \"dataset = 'bridge'\")")
    p.add_argument("--config", help="YAML/JSON file of TrainConfig settings (model, data, lr, ...)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=train_command)

    p = sub.add_parser("evaluate", help="held-out metrics, next-frame picture, closed-loop Meta-World success")
    p.add_argument("--lake", required=True)
    p.add_argument("--checkpoint", help="checkpoint id or directory (default: the latest)")
    p.add_argument("--episodes", type=int, help="closed-loop episodes (default 20; 0: none)")
    p.add_argument("--videos", type=int, help="rollouts kept as mp4 (default 2)")
    p.add_argument("--env", help="Meta-World task (default: from the episodes' instruction)")
    p.add_argument("--max-steps", type=int, help="steps per closed-loop episode (default 200)")
    p.add_argument("--first-seed", type=int, help="seed of the first episode (default 1000)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=evaluate_command)
