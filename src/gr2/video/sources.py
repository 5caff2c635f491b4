"""Sources: turn what a user typed (directories, globs, manifests, object-store URIs) into inputs.

An input is a dict {uri, caption, dataset, source_error}. A manifest row that cannot become an
input (no uri) is still an input: it carries `source_error`, so the build records it as failed
instead of losing it. A directory names every file in it, whatever its extension: ffprobe, not the
name, decides what is video (camcorder .mts, phone .3gp, .wmv, .mxf, .ogv are; a .m4a or a .txt
becomes a row saying it is not), so no file in a source ever vanishes without a row.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from glob import glob as local_glob

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gr2.errors import Gr2Error
from gr2.lake.uri import find, glob, is_remote, join, local_path, url_to_fs

MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".parquet")


class SourceError(Gr2Error):
    """A source that cannot be listed at all (a manifest that does not parse, a missing path)."""


def _input(uri, caption=None, dataset=None, error=None) -> dict:
    return {"uri": uri, "caption": caption, "dataset": dataset, "source_error": error}


def list_inputs(sources: list[str]) -> list[dict]:
    """Every input named by `sources`, in a stable order, each uri once."""
    seen: dict[str, dict] = {}
    for source in sources:
        for item in _expand(source):
            key = item["uri"] if item["source_error"] is None else f"{item['uri']}#{len(seen)}"
            # A uri named twice (a glob and a manifest) is one input; the richer record wins.
            if key not in seen or (item["caption"] and not seen[key]["caption"]):
                seen[key] = item
    return list(seen.values())


def _expand(source: str) -> list[dict]:
    lower = source.lower().split("?")[0]
    if lower.endswith(MANIFEST_EXTENSIONS):
        return read_manifest(source)
    if any(ch in source for ch in "*?["):
        return [_input(u) for u in _glob(source)]
    if is_remote(source):
        fs, path = url_to_fs(source)
        if fs.isdir(path):
            return [_input(u) for u in find(source)]
        return [_input(source)]
    path = local_path(source)
    if os.path.isdir(path):
        found = []
        for dirpath, _, files in os.walk(path):
            found += [os.path.join(dirpath, f) for f in files]
        return [_input(os.path.abspath(p)) for p in sorted(found)]
    # A single file: even one that does not exist is an input (it will be recorded as failed).
    return [_input(os.path.abspath(path))]


def _glob(pattern: str) -> list[str]:
    if is_remote(pattern):
        return glob(pattern)
    return [os.path.abspath(p) for p in sorted(local_glob(pattern, recursive=True)) if os.path.isfile(p)]


def read_manifest(uri: str) -> list[dict]:
    """Inputs from a CSV/JSONL/Parquet manifest with a `uri` column and optional caption/dataset."""
    try:
        fs, path = url_to_fs(uri)
        with fs.open(path, "rb") as f:
            raw = f.read()
    except (OSError, ValueError) as e:
        raise SourceError(f"manifest {uri}: cannot read ({e})") from None
    columns = _parse_manifest(uri, raw)
    if "uri" not in columns:
        raise SourceError(f"manifest {uri}: no 'uri' column (columns: {', '.join(columns) or 'none'})")
    base = os.path.dirname(uri)
    n = len(columns["uri"])
    col = {name: columns.get(name, [None] * n) for name in ("uri", "caption", "dataset")}
    inputs = []
    for i, (u, caption, dataset) in enumerate(zip(col["uri"], col["caption"], col["dataset"])):
        where = f"manifest {uri} row {i + 1}"
        if u is None or (isinstance(u, str) and not u.strip()):
            inputs.append(_input(where, error=f"{where}: missing uri"))
            continue
        if not isinstance(u, str):
            inputs.append(_input(where, error=f"{where}: uri is {type(u).__name__}, not a string"))
            continue
        u = u.strip()
        if "\x00" in u:
            inputs.append(_input(where, error=f"{where}: uri contains a NUL byte"))
            continue
        if is_remote(base) and not is_remote(u):
            # A manifest in object storage names objects: never a file of the machine that reads it
            # (a worker's /etc, a mounted volume), and its relative rows stay under its own prefix.
            if u.startswith(("/", "file:", "~")) or posixpath.normpath(u).startswith(".."):
                inputs.append(_input(where, error=f"{where}: names {u!r}, a local path; a manifest in object "
                                                  "storage may name only objects (other URIs, or paths under it)"))
                continue
            u = join(base, posixpath.normpath(u))
        elif not is_remote(u) and not os.path.isabs(u):
            u = os.path.abspath(os.path.join(base, u))  # a local manifest may name local files anywhere
        inputs.append(_input(u, _text(caption), _text(dataset)))
    return inputs


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _parse_manifest(uri: str, raw: bytes) -> dict[str, list]:
    """The manifest's columns as Python lists (values of any type; read_manifest validates)."""
    lower = uri.lower().split("?")[0]
    try:
        if lower.endswith(".parquet"):
            return pq.read_table(io.BytesIO(raw)).to_pydict()
        if lower.endswith(".csv"):
            # Read every column as text: a manifest's uri column of numbers is still a uri column.
            head = pacsv.read_csv(io.BytesIO(raw), read_options=pacsv.ReadOptions(block_size=1 << 20)).column_names
            opts = pacsv.ConvertOptions(column_types={name: pa.string() for name in head})
            return pacsv.read_csv(io.BytesIO(raw), convert_options=opts).to_pydict()
        rows = []
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"line {n} is not a JSON object")
                rows.append(row)
        keys = {k for row in rows for k in row}
        return {k: [row.get(k) for row in rows] for k in keys} if rows else {"uri": []}
    except (pa.ArrowException, ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"manifest {uri}: does not parse ({str(e).splitlines()[0]})") from None
