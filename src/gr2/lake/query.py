"""Finding clips: vector search by text or by example clip, filters, and SQL over the lake.

    from gr2.lake.query import query, sql
    from gr2.video.embed import embedder_for
    hits = query("lake/", text="a hand opens a drawer", where="duration_s > 2", k=20, embedder=embedder_for("lake/"))
    hits.to_pandas()                    # clip_id, score, caption, ... one row per hit, best first
    query("lake/", like=hits["clip_id"][0].as_py())   # clips that look like that one
    sql("lake/", "select dataset, count(*) from clips group by dataset").to_pandas()

Text is embedded by the same CLIP model and weights the lake's clips were embedded with (recorded
in every row), so scores are cosines in one space; a text already embedded by that model is taken
from a cache instead of the encoder. Search goes through Lance, and `plan_search` chooses how: a
filter that keeps few rows is applied first and those rows' vectors are compared exactly; otherwise
the vector index (see index.py) is searched with the filter applied inside it (prefilter), probing
more partitions the fewer rows the filter keeps; should those partitions hold fewer than k of the
filter's rows, the query falls back to exact search, so it never returns short. The plan rides
along in the result's schema metadata (`hits.schema.metadata[b"gr2.plan"]`).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import lance
import numpy as np
import pyarrow as pa

from gr2.errors import Gr2Error
from gr2.lake import schema
from gr2.lake.index import VECTOR_COLUMN, VECTOR_INDEX, vector_index_settings
from gr2.lake.lake import Lake
from gr2.lake.uri import storage_options

DEFAULT_COLUMNS = ("caption", "caption_source", "text_score", "duration_s", "start_s", "end_s", "uri", "dataset",
                   "video_id")
# Searching more IVF partitions and re-ranking quantized candidates by their full vectors trades a little
# latency for recall (measured in benchmarks/query_latency.py). These are the 1M-row settings, which
# dedup's neighbour search uses; a query takes its own from the table's size (plan_search).
NPROBES = 64
REFINE_FACTOR = 10
# A filter keeping at most this many rows is searched exactly. Exact search reads each kept row's
# full vector by random access (~13 us a row at 1M rows here, Lance's flat search and a plain read
# alike), while the index reads the compact codes of the probed partitions (~20 ms at 1M rows with 4x the
# probes): they cost the same near 2,000 rows (benchmarks/query_latency.py, selectivity sweep).
# Below it exact search is as fast and returns every kept row the index's partitions might miss.
EXACT_MAX_ROWS = 2_000
# A filtered search through the index probes more partitions, since the filter's k best rows lie
# farther out: probes grow as selectivity^(-1/3), up to this multiple of the unfiltered probes
# (measured at 1M rows: 10% of rows needs 2x for recall@10 0.98, 0.4% needs 4x for 0.97-0.99),
# and its candidates are re-ranked deeper.
MAX_PROBE_GROWTH = 4.0
FILTERED_REFINE_FACTOR = 20


@dataclass(frozen=True)
class SearchPlan:
    """How a vector query runs: `method` "exact" (filter, then compare every kept vector) or "index"."""

    method: str
    reason: str
    rows: int
    matched_rows: int | None = None  # rows the filter keeps (counted with the scalar indexes)
    nprobes: int | None = None
    refine_factor: int | None = None


class TextVectorCache:
    """Text embeddings already computed, keyed by (model name, weights tag, text); least recently used go first.

    A notebook re-running a query pays the CLIP text encoder (~50 ms on CPU) once. The key names the
    model, not the embedder object, because `embedder_for(lake)` makes a new one on every call.
    """

    def __init__(self, size: int = 4096):
        self.size, self.hits, self.misses = size, 0, 0
        self._vectors: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def vector(self, embedder, text: str) -> np.ndarray:
        weights = getattr(embedder, "weights", None)
        model = getattr(embedder, "model_name", None)
        if model is None:  # an embedder that cannot say which model it is: never cached
            return np.asarray(embedder.embed_text([text])[0], np.float32)
        key = (model, getattr(weights, "tag", None), text)
        if key in self._vectors:
            self.hits += 1
            self._vectors.move_to_end(key)
            return self._vectors[key]
        self.misses += 1
        vector = np.asarray(embedder.embed_text([text])[0], np.float32)
        vector.flags.writeable = False  # shared by every later hit
        self._vectors[key] = vector
        if len(self._vectors) > self.size:
            self._vectors.popitem(last=False)
        return vector


# Lance caches opened indexes (IVF centroids, quantized codes, bitmaps) per session, and a dataset opened
# without one gets a fresh, empty session: every query then re-read its index partitions from disk
# (p50 ~240 ms instead of ~20 ms for a filtered query at 1M rows). One session per process, shared by
# every dataset this module opens; a new table version reuses the index files it shares with the old.
SESSION = lance.Session()

# One per process, on purpose: embeddings are pure functions of (model, weights, text), and the
# process is what re-runs queries. Clear it with TEXT_VECTORS = TextVectorCache() in tests.
TEXT_VECTORS = TextVectorCache()


class QueryError(Gr2Error):
    """A query that cannot run: empty, a filter that does not parse, an unknown column or clip."""


def open_lake(lake: Lake | str) -> Lake:
    """`lake` as a Lake that exists, or QueryError."""
    lake = lake if isinstance(lake, Lake) else Lake(str(lake))
    if not lake.exists():
        raise QueryError(f"no lake at {lake.root}")
    return lake


def clips_dataset(lake: Lake, version: int | str | None = None):
    if not lake.exists("clips"):
        raise QueryError(f"lake {lake.root} has no clips yet")
    try:
        # Opened as Lake.dataset opens it, but in the shared session, so the indexes that one
        # query loaded serve the next.
        return lance.dataset(lake.uri("clips"), version=version, storage_options=storage_options(lake.root),
                             session=SESSION)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise QueryError(f"lake {lake.root}: no clips version {version!r} ({e})") from None


def query(lake: Lake | str, text: str | None = None, like: str | None = None, where: str | None = None,
          k: int = 20, columns: list[str] | None = None, *, status: str | None = "accepted",
          exact: bool = False, version: int | str | None = None, embedder=None, vector=None,
          nprobes: int | None = None, refine_factor: int | None = None) -> pa.Table:
    """The `k` clips best matching `text` or most like clip `like`, filtered by `where` (SQL).

    Returns a pyarrow Table (`.to_pandas()` for a DataFrame): `clip_id`, `score` (cosine
    similarity; null for a filter-only query), then `columns` (default DEFAULT_COLUMNS).
    `status` keeps only clips of that status (None: all). `version` reads an earlier build (a
    number or a build id tag). `embedder` embeds `text` (gr2.video.embed.embedder_for(lake) gives
    the model the clips were embedded with); `vector` searches with an embedding of your own.
    `nprobes` and `refine_factor` override the planner's for an indexed search.
    """
    text = text.strip() if isinstance(text, str) else text
    like = like.strip() if isinstance(like, str) else like
    where = where.strip() if isinstance(where, str) else where
    if text == "" or like == "" or (not text and not like and vector is None and not where):
        raise QueryError("empty query: give text, a clip id to search like, or a where filter")
    if sum(x is not None and x != "" for x in (text, like)) + (vector is not None) > 1:
        raise QueryError("give one of text, like or vector")
    if k < 1:
        raise QueryError(f"k must be at least 1 (got {k})")
    lake = open_lake(lake)
    ds = clips_dataset(lake, version)
    names = ds.schema.names
    unknown = [c for c in columns or () if c not in names and c != "score"]
    if unknown:
        raise QueryError(f"unknown column {unknown[0]!r} (clips has: {', '.join(names)})")
    columns = [c for c in (columns or DEFAULT_COLUMNS) if c in names and c not in ("clip_id", "score")]
    filters = [f"({where})"] if where else []
    if status:
        filters.append(f"status = {sql_literal(status)}")

    if like:
        vector = _clip_vector(ds, like, lake)
    elif text:
        if embedder is None:
            # The lake knows which CLIP made its embeddings (recorded per row) but never loads a model:
            # video/embed.py does, and hands the query one.
            raise QueryError("text search needs the text model the clips were embedded with: "
                             "query(lake, text=..., embedder=gr2.video.embed.embedder_for(lake))")
        vector = TEXT_VECTORS.vector(embedder, text)
    if vector is not None and "embedding" in names:
        dim = ds.schema.field("embedding").type.list_size
        if np.asarray(vector).shape != (dim,):
            raise QueryError(f"the lake's embeddings are {dim}-d; the query vector has shape {np.asarray(vector).shape}")
    if vector is None:
        table = _run(ds, where, dict(columns=["clip_id", *columns], filter=" AND ".join(filters), limit=k))
        return _with_score(table, pa.nulls(len(table), pa.float32())).select(["clip_id", "score", *columns])

    # No "embedding IS NOT NULL" filter: Lance's search already skips null vectors, and that
    # filter would read every embedding to evaluate it (0.7 s at 1M rows).
    where_all = " AND ".join(filters)
    try:
        plan = plan_search(ds, where_all or None, k, exact=exact, nprobes=nprobes, refine_factor=refine_factor)
    except (ValueError, OSError) as e:  # the count ran the user's filter first
        raise QueryError(_filter_error(str(e), where, names)) from None
    nearest = {"column": VECTOR_COLUMN, "q": np.asarray(vector, np.float32), "k": k, "metric": "cosine",
               "use_index": plan.method == "index"}
    if plan.method == "index":
        nearest.update(nprobes=plan.nprobes, refine_factor=plan.refine_factor)
    scan = dict(columns=["clip_id", *columns, "_distance"], filter=where_all or None, prefilter=True, nearest=nearest)
    table = _run(ds, where, scan)
    if plan.method == "index" and len(table) < min(k, plan.matched_rows):
        # The probed partitions held fewer than k of the filter's rows: the filter's rows are all
        # there are to search, so compare them all rather than return short.
        plan = replace(plan, method="exact", reason=f"{plan.reason}; the index found {len(table)} < {k}")
        table = _run(ds, where, {**scan, "nearest": {**nearest, "use_index": False}})
    score = pa.array(np.clip(1.0 - table.column("_distance").to_numpy(zero_copy_only=False), -1.0, 1.0), pa.float32())
    table = _with_score(table, score).sort_by([("score", "descending")])
    table = table.select(["clip_id", "score", *columns])
    return table.replace_schema_metadata({b"gr2.plan": json.dumps(asdict(plan)).encode()})


def plan_search(ds, where: str | None, k: int, *, exact: bool = False, nprobes: int | None = None,
                refine_factor: int | None = None) -> SearchPlan:
    """Choose exact search over the filter's rows or the vector index with prefilter, from the filter's selectivity.

    The filter's rows are counted with Lance's scalar indexes (bitmaps: a few ms at 1M rows), not
    guessed: the same filter keeps 0.4% of one lake and 60% of another.
    """
    rows = ds.count_rows()
    indexed = {i.name: i for i in ds.describe_indices()}.get(VECTOR_INDEX)
    if exact:
        return SearchPlan("exact", "asked for", rows)
    if indexed is None:
        return SearchPlan("exact", "no vector index (small table)", rows)
    matched = ds.count_rows(filter=where) if where else rows
    if matched <= max(EXACT_MAX_ROWS, k):
        return SearchPlan("exact", f"filter keeps {matched} rows <= {EXACT_MAX_ROWS}", rows, matched)
    # The index was built with the settings its row count called for; search it the same way.
    dim = ds.schema.field(VECTOR_COLUMN).type.list_size
    settings = vector_index_settings(max(int(indexed.num_rows_indexed or rows), 1), dim)
    selectivity = matched / max(rows, 1)
    growth = min(MAX_PROBE_GROWTH, selectivity ** (-1 / 3))  # ~1 for a filter keeping most rows
    probes = nprobes or min(settings.partitions, round(settings.nprobes * growth))
    refine = refine_factor or (FILTERED_REFINE_FACTOR if selectivity < 0.5 else settings.refine_factor)
    return SearchPlan("index", f"filter keeps {selectivity:.1%} of {rows} rows", rows, matched, probes, refine)


def _clip_vector(ds, clip_id: str, lake: Lake) -> np.ndarray:
    rows = _run(ds, None, dict(columns=["embedding"], filter=f"clip_id = {sql_literal(clip_id)}", limit=1)).to_pylist()
    if not rows:
        raise QueryError(f"no clip {clip_id!r} in lake {lake.root}")
    if rows[0]["embedding"] is None or not np.isfinite(rows[0]["embedding"]).all():
        raise QueryError(f"clip {clip_id!r} has no embedding to search with")
    return np.asarray(rows[0]["embedding"], np.float32)


def _run(ds, where: str | None, scan: dict) -> pa.Table:
    """Run a Lance scan, turning its errors about the user's filter into one-line QueryErrors."""
    try:
        return ds.to_table(**scan)
    except (ValueError, OSError) as e:
        raise QueryError(_filter_error(str(e), where, ds.schema.names)) from None


def _filter_error(message: str, where: str | None, names: list[str]) -> str:
    missing = re.search(r"No field named ([\w\"]+(?:\.[\w\"]+)*)", message)
    if missing:
        return f"unknown column {missing.group(1).strip(chr(34))!r} in where (clips has: {', '.join(names)})"
    detail = message.replace("Invalid user input: ", "").split(", /")[0]
    parse = re.search(r"sql parser error: (.*?)\)?$", detail)
    detail = parse.group(1) if parse else detail
    detail = " ".join(detail.split())[:300]
    return f"where {where!r} does not parse: {detail}" if where else detail


def _with_score(table: pa.Table, score: pa.Array) -> pa.Table:
    table = table.drop_columns([c for c in ("_distance", "score") if c in table.column_names])
    return table.append_column("score", score)


def sql_literal(value: str) -> str:
    """`value` as an SQL string literal for a Lance filter (quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _has_unsigned(t: pa.DataType) -> bool:
    if pa.types.is_unsigned_integer(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _has_unsigned(t.value_type)
    if pa.types.is_struct(t):
        return any(_has_unsigned(t.field(i).type) for i in range(t.num_fields))
    return False


def sql(lake: Lake | str, statement: str, read_only: bool = False) -> pa.Table:
    """Run a DuckDB SQL `statement` over the lake's tables (videos, clips, builds, ...) as Arrow.

    DuckDB can read and write any file this process can (`read_csv('/...')`, `COPY ... TO`): right
    for a local command, wrong for anything that runs other people's queries. `read_only` turns
    DuckDB's file system access off once the lake's tables are registered; the tables still answer.
    """
    import duckdb

    if not statement or not statement.strip():
        raise QueryError("empty SQL statement")
    lake = open_lake(lake)
    con = duckdb.connect()
    try:
        # DuckDB scans Lance datasets directly (they are Arrow datasets), pushing down columns and filters.
        unsigned = False
        for table in schema.TABLE_IDS:
            if lake.exists(table):
                ds = lake.dataset(table)
                con.register(table, ds)
                unsigned |= any(_has_unsigned(f.type) for f in ds.schema)
        if unsigned:
            # Lance (pylance 14) cannot read back the Substrait that a pushed-down filter becomes when
            # the table has unsigned integers (VQ tokens are uint16): DuckDB filters instead, and
            # still pushes down the columns it reads.
            con.sql("SET disabled_optimizers = 'filter_pushdown'")
        if read_only:
            con.execute("SET enable_external_access = false")  # cannot be turned back on by the statement
        result = con.sql(statement)
        return result.to_arrow_table() if result is not None else pa.table({})
    except duckdb.Error as e:
        lines = []
        for line in str(e).splitlines():
            if not line.strip() or line.startswith("LINE "):
                break
            lines.append(line.strip())
        raise QueryError(" ".join(lines) or type(e).__name__) from None
    finally:
        con.close()
