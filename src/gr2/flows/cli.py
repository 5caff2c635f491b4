"""The `gr2` command line: parse, call the flow, print. Errors are one line and exit non-zero.

Each `*_cli` module adds its subcommands and imports its flow (Prefect, Ray, torch) only inside the
command that runs, so `gr2 --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys

from gr2.errors import Gr2Error
from gr2.flows import build_cli, query_cli, robot_cli, tokenizer_cli, train_cli

COMMANDS = (build_cli, query_cli, robot_cli, tokenizer_cli, train_cli)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gr2", description="The data engine behind a GR-2 style model.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from gr2.flows.runtime import offline_defaults

    offline_defaults()
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

    return isinstance(e, (Gr2Error, ValidationError, FileNotFoundError))


def _one_line(e: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
