"""`gr2 ingest-robot`, `record-metaworld`, `doctor`, `export-lerobot`: robot trajectories from the command line."""

from __future__ import annotations

from gr2.flows.options import CommandError, csv_list, read_settings


def _offsets(pairs: list[str] | None) -> dict[str, float]:
    out = {}
    for pair in pairs or []:
        name, _, value = pair.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise CommandError(f"--offset {pair!r}: expected CAMERA=SECONDS, e.g. corner=0.03") from None
    return out


def ingest_robot(args) -> str:
    from gr2.flows.robot import IngestRobotParams, funnel_markdown, ingest_robot_trajectories

    data = read_settings(args.config)
    overrides = {
        "cameras": csv_list(args.cameras) or None,
        "offsets_s": {**data.get("offsets_s", {}), **_offsets(args.offset)} or None,
        "estimate_cameras": csv_list(args.estimate_offsets) or None,
        "max_step_hz": args.max_step_hz,
        "tokenizer": args.tokenizer,
        "concurrency": args.workers,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = IngestRobotParams(sources=args.sources, lake=args.lake, config=data).config
    result = ingest_robot_trajectories(sources=args.sources, lake=args.lake, config=config)
    return funnel_markdown(result["build_id"], result["funnel"]) + f"\nlake: {result['lake']}"


def record_metaworld(args) -> str:
    from gr2.sim.record import RecordConfig, record

    tasks = csv_list(args.tasks)
    if not tasks:
        raise CommandError("--tasks: name at least one Meta-World task, e.g. drawer-open-v3")
    config = RecordConfig(tasks=tasks, episodes=args.episodes, seed=args.seed, width=args.size, height=args.size,
                          declare_latency=not args.hide_latency)
    if args.workers and args.workers > 1:
        from gr2.flows.runtime import ensure_ray

        ensure_ray(num_cpus=args.workers)
    info = record(args.out, config)
    eps = info["gr2_recording"]["episodes"]
    ok = sum(e["success"] for e in eps)
    cams = ", ".join(f"{c['name']} {c['fps']:g} Hz +{c['offset_s'] * 1000:.0f} ms" for c in info["gr2_recording"]["cameras"].values())
    return f"recorded {len(eps)} episodes ({ok} successful, {info['total_frames']} steps) to {args.out}; cameras: {cams}"


def doctor(args) -> str:
    from gr2.lake.lake import Lake
    from gr2.robot.doctor import examine, residual_png

    lake = Lake(args.lake)
    if not lake.exists("episodes"):
        raise CommandError(f"no robot episodes in a lake at {lake.root}: run gr2 ingest-robot first")
    diagnosis = examine(lake, args.dataset)
    if args.json:
        with open(args.json, "w") as f:
            f.write(diagnosis.to_json())
    if args.png:
        residual_png(diagnosis, args.png)
    written = [p for p in (args.json, args.png) if p]
    return diagnosis.table() + (f"\nwrote {', '.join(written)}" if written else "")


def export_lerobot(args) -> str:
    from gr2.lake.lake import Lake
    from gr2.robot.export import ExportConfig, export_lerobot

    lake = Lake(args.lake)
    if not lake.exists("episodes"):
        raise CommandError(f"no robot episodes in a lake at {lake.root}: run gr2 ingest-robot first")
    config = ExportConfig(where=args.where, cameras=csv_list(args.cameras), fps=args.fps)
    return export_lerobot(lake, args.out, config).summary()


def register(sub) -> None:
    p = sub.add_parser("ingest-robot", help="ingest robot episodes (LeRobot, HDF5, CALVIN, annotated JSON) into a lake")
    p.add_argument("--lake", required=True, help="lake root: a directory or s3://bucket/prefix")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="dataset directories or HDF5 files, local or s3://bucket/prefix")
    p.add_argument("--config", help="YAML/JSON file of IngestConfig settings")
    p.add_argument("--cameras", help="views to keep, in order, comma-separated (default: all)")
    p.add_argument("--offset", action="append", metavar="CAMERA=SECONDS", help="a camera's latency (repeatable)")
    p.add_argument("--estimate-offsets", metavar="CAMERAS", help="cameras whose latency to estimate ('*': all)")
    p.add_argument("--max-step-hz", type=float, help="decimate faster state streams to this rate")
    p.add_argument("--tokenizer", help="tokenizer checkpoint directory: also write per-view token grids")
    p.add_argument("--workers", type=int, help="parallel episode workers (default 2)")
    p.set_defaults(run=ingest_robot)

    p = sub.add_parser("record-metaworld", help="record Meta-World expert episodes as a multi-camera LeRobot dataset")
    p.add_argument("--out", required=True, help="a new directory for the dataset")
    p.add_argument("--tasks", default="drawer-open-v3", help="comma-separated Meta-World v3 tasks")
    p.add_argument("--episodes", type=int, default=2, help="episodes per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="frame width and height in pixels")
    p.add_argument("--hide-latency", action="store_true", help="do not declare camera latencies in info.json")
    p.add_argument("--workers", type=int, help="record episodes in parallel on a local Ray")
    p.set_defaults(run=record_metaworld)

    p = sub.add_parser("doctor", help="check a lake's robot episodes: clocks, frame rates, frozen/black/swapped cameras, "
                                      "NaN or wild values, alignment residuals")
    p.add_argument("--lake", required=True)
    p.add_argument("--dataset", help="only this dataset (default: all)")
    p.add_argument("--json", metavar="FILE", help="also write every finding as JSON")
    p.add_argument("--png", metavar="FILE", help="also draw each camera's alignment residuals over time")
    p.set_defaults(run=doctor)

    p = sub.add_parser("export-lerobot", help="write a lake's accepted robot episodes as LeRobot v3.0 datasets "
                                              "(one per state rate)")
    p.add_argument("--lake", required=True)
    p.add_argument("--out", required=True,
                   help="a new directory; with several state rates, one dataset per <fps>hz inside")
    p.add_argument("--where", metavar="SQL", help="which accepted episodes, e.g. \"dataset = 'drawer'\"")
    p.add_argument("--cameras", help="views to export, in order, comma-separated (default: the first episode's)")
    p.add_argument("--fps", type=int, help="export only the episodes at this state rate, as one dataset at --out")
    p.set_defaults(run=export_lerobot)
