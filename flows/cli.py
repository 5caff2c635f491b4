"""The `gr2` command line: parse, call the flow, print. Errors are one line and exit non-zero."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# Modules that add their own subcommands through `register(subparsers)`.
COMMAND_MODULES = ("gr2.flows.build_cli", "gr2.flows.query", "gr2.flows.robot", "gr2.flows.tokenizer", "gr2.flows.train")


class CommandError(Exception):
    """A problem with what the user asked for; printed as one line."""


def read_settings(path: str | None) -> dict:
    """The mapping of settings in a YAML/JSON file (a flow's config); {} without a path."""
    import yaml

    if not path:
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise CommandError(f"config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CommandError(f"config {path}: does not parse ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CommandError(f"config {path}: expected a mapping of settings")
    return data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gr2", description="The data engine behind a GR-2 style model.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from gr2.flows.runtime import offline_defaults

    offline_defaults()
    args = parser().parse_args(argv)
    try:
        out = args.run(args)
    except KeyboardInterrupt:
        print("gr2: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the boundary: every error the user can cause becomes one line
        if not _is_user_error(e):
            raise
        print(f"gr2 {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if out is not None:
        print(out if isinstance(out, str) else json.dumps(out, indent=2, default=str))
    return 0


def _is_user_error(e: Exception) -> bool:
    from pydantic import ValidationError

    from gr2.pipelines.lake import LakeError
    from gr2.pipelines.sources import SourceError

    names = {"QueryError", "ModelWeightsError", "CheckpointError", "AlignmentError", "ConfigError"}
    return isinstance(e, (CommandError, LakeError, SourceError, ValidationError, FileNotFoundError)) or \
        type(e).__name__ in names


def _one_line(e: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
    return " ".join(str(e).split())


if __name__ == "__main__":
    from gr2.flows import cli  # run the imported module, so its exception types are the ones raised

    sys.exit(cli.main())
