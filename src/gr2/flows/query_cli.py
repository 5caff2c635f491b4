"""`gr2 query`, `gr2 sql`, `gr2 index`: finding clips in a lake from the command line."""

from __future__ import annotations

import base64
import json
import math

FORMATS = ("table", "json", "html")


def _plain(value):
    """A cell as JSON: bytes as base64, NaN as null."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def as_json(table) -> str:
    return json.dumps([{k: _plain(v) for k, v in row.items()} for row in table.to_pylist()], indent=2, default=str)


def as_text(table, max_width: int = 60) -> str:
    import pyarrow as pa

    keep = [f.name for f in table.schema if not pa.types.is_binary(f.type) and not pa.types.is_fixed_size_list(f.type)]
    if len(table) == 0:
        return "no hits"
    df = table.select(keep).to_pandas()
    return df.to_string(index=False, max_colwidth=max_width, float_format=lambda v: f"{v:.3f}", na_rep="-")


def _emit(text: str, out: str | None, what: str) -> str:
    if not out:
        return text
    with open(out, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return f"wrote {what} to {out}"


def run_query(args) -> str:
    from gr2.lake import gallery
    from gr2.lake.query import clips_dataset, open_lake, query
    from gr2.video.embed import embedder_for

    lake = open_lake(args.lake)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    if args.format == "html":
        names = clips_dataset(lake, args.at).schema.names
        columns = list(dict.fromkeys([c for c in gallery.GALLERY_COLUMNS if c in names] + (columns or [])))
    embedder = embedder_for(lake, args.at) if args.text else None
    hits = query(lake, text=args.text, like=args.like, where=args.where, k=args.k, columns=columns,
                 status=None if args.any_status else "accepted", exact=args.exact, version=args.at,
                 embedder=embedder)
    what = f"{len(hits)} hits"
    if args.format == "json":
        return _emit(as_json(hits), args.out, what)
    if args.format == "html":
        asked = args.text or (f"like {args.like}" if args.like else "")
        subtitle = " · ".join(x for x in (f"“{asked}”" if args.text else asked, args.where and f"where {args.where}",
                                          f"{len(hits)} hits", lake.root) if x)
        return _emit(gallery.render(hits, "gr2 query", subtitle), args.out, what)
    return _emit(as_text(hits), args.out, what)


def run_sql(args) -> str:
    from gr2.lake.query import sql

    result = sql(args.lake, args.statement, read_only=args.read_only)
    text = as_json(result) if args.format == "json" else as_text(result, max_width=80)
    return _emit(text, args.out, f"{len(result)} rows")


def run_index(args) -> str:
    from gr2.lake.index import MIN_ROWS, build_indexes
    from gr2.lake.query import open_lake

    return json.dumps(build_indexes(open_lake(args.lake), min_rows=args.min_rows or MIN_ROWS), indent=2)


def register(sub) -> None:
    p = sub.add_parser("query", help="find clips by text, by example clip, or by filter")
    p.add_argument("--lake", required=True, help="lake root: a directory or s3://bucket/prefix")
    p.add_argument("--text", help='what the clips show, e.g. "a hand opens a drawer"')
    p.add_argument("--like", metavar="CLIP_ID", help="clips that look like this clip")
    p.add_argument("--where", help='SQL filter on clip columns, e.g. "duration_s > 2 AND dataset = \'ego4d\'"')
    p.add_argument("--k", type=int, default=20, help="number of hits (default 20)")
    p.add_argument("--columns", help="comma-separated clip columns to show beside clip_id, score")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--out", metavar="FILE", help="write the result here instead of printing it")
    p.add_argument("--exact", action="store_true", help="exact search, ignoring the vector index")
    p.add_argument("--any-status", action="store_true", help="include rejected and failed clips")
    p.add_argument("--at", metavar="VERSION", type=_version, help="an earlier lake version or build id")
    p.set_defaults(run=run_query)

    p = sub.add_parser("sql", help="SQL over the lake's tables with DuckDB")
    p.add_argument("--lake", required=True)
    p.add_argument("statement", help='e.g. "select dataset, count(*) from clips group by 1"')
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--out", metavar="FILE")
    p.add_argument("--read-only", action="store_true",
                   help="no file access beyond the lake's tables (DuckDB can otherwise read and write any file)")
    p.set_defaults(run=run_sql)

    p = sub.add_parser("index", help="build or update the clips table's vector and scalar indexes")
    p.add_argument("--lake", required=True)
    p.add_argument("--min-rows", type=int, help="embeddings needed before an IVF_PQ index (default 10000)")
    p.set_defaults(run=run_index)


def _version(value: str) -> int | str:
    return int(value) if value.isdigit() else value
