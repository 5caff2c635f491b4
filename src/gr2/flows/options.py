"""What every command shares for reading its options: the one-line error and settings files."""

from __future__ import annotations

from gr2.errors import Gr2Error


class CommandError(Gr2Error):
    """A problem with what the user asked for on the command line; printed as one line."""


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


def csv_list(value: str | None) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'); () for nothing."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()
