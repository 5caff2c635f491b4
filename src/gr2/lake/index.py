"""Indexes on the clips table, built after a build: Lance's own vector and scalar indexes.

Below `min_rows` embeddings there is no vector index: an exact scan of a few thousand vectors takes
milliseconds and is exact. Above it, an IVF_RQ index (cosine) whose shape follows the table's size
(`vector_index_settings`). Later builds' fragments join the existing index without retraining it:
Lance's optimize_indices writes a delta segment for the new rows, assigned to the trained
partitions and codebook, which a search reads beside the main one. (Letting it merge the delta into
the main segment instead left pylance 14's IVF_PQ with one partition and recall@10 0.86 where the
delta kept 0.97.) The index is retrained once the table has grown
`retrain_growth` times since training, so its partitions keep fitting the data, or once
`MAX_DELTAS` builds have each added a segment every search must read. Scalar indexes (bitmaps for
few-valued columns, B-trees for ranges and ids) cover the columns people filter on, and serve the planner's selectivity count
in query.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from gr2.lake.lake import Lake

VECTOR_COLUMN = "embedding"
VECTOR_INDEX = "embedding_idx"
MIN_ROWS = 10_000
MAX_DELTAS = 8
SCALAR_INDEXES = {
    "clip_id": "BTREE",  # --like lookups and the committer's merge on id
    "video_id": "BTREE",
    "status": "BITMAP",
    "dataset": "BITMAP",
    "caption_source": "BITMAP",
    "clip_model": "BITMAP",
    "build_id": "BITMAP",
    "duration_s": "BITMAP",  # few distinct values (clips are windows of a set length); ranges over a
    # bitmap cost ~6 ms at 1M rows where a B-tree took ~200 ms (benchmarks/query_latency.py)
    "text_score": "BTREE",
}


@dataclass(frozen=True)
class VectorIndexSettings:
    """How to build the vector index for a table of `rows` embeddings, and how to search it."""

    index_type: str
    partitions: int
    num_sub_vectors: int  # IVF_PQ only
    nprobes: int  # partitions searched by an unfiltered query; query.py widens it for filters
    refine_factor: int  # quantized candidates re-ranked by their full vectors: k * refine_factor


def vector_index_settings(rows: int, dim: int) -> VectorIndexSettings:
    """Index shape and search depth for `rows` vectors of `dim`, from benchmarks/query_latency.py.

    IVF_RQ (RaBitQ codes) with refine: at 1M x 512-d with 1,000 partitions, 68 probes and a refine
    factor of 10 it recalled the exact top 10 under a filter keeping 10% of rows 1.000 of the time,
    where IVF_PQ (32 sub-vectors) recalled 0.923 at 64 probes, and it trained in about half the time
    (224 s vs 411 s, both on the shared machine); at 100k rows IVF_RQ, IVF_PQ and IVF_HNSW_SQ are
    compared in benchmarks/results/query_latency.json (small.index_kinds).
    Partitions grow as sqrt(rows) (1,000 rows each at 1M: the centroid scan and the partition scans
    cost about the same), so 10k rows get 100 and 10M get ~3,200. Probes: 6.4% of the partitions,
    but never fewer than 2 * sqrt(partitions): at 100k rows 6.4% (21 of 316) left a text query with
    none of its true top 10, and small tables can afford more.
    """
    partitions = max(16, int(math.sqrt(rows)))
    # Used if IVF_PQ is chosen: 16 dimensions per sub-vector, 32 bytes a 512-d vector.
    subvectors = max(1, dim // 16)
    nprobes = min(partitions, max(16, round(partitions * 0.064), round(2 * math.sqrt(partitions))))
    return VectorIndexSettings("IVF_RQ", partitions, subvectors, nprobes, refine_factor=10)


def vector_index_of(ds) -> dict | None:
    """The vector index's partition count and coverage, or None when the table has none."""
    if VECTOR_INDEX not in {i.name for i in ds.describe_indices()}:
        return None
    stats = ds.stats.index_stats(VECTOR_INDEX)
    return {"index_type": stats["index_type"], "partitions": stats["indices"][0]["num_partitions"],
            "indexed_rows": stats["num_indexed_rows"], "unindexed_rows": stats["num_unindexed_rows"]}


def build_indexes(lake: Lake, min_rows: int = MIN_ROWS, retrain_growth: float = 4.0) -> dict:
    """Create or update the clips table's indexes; returns what was done (for the build artifact)."""
    if not lake.exists("clips"):
        return {"vector": "none (no clips table)", "scalar": []}
    t0 = time.time()
    with lake.lease(), lake.storage_errors("index the clips table"):
        ds = lake.dataset("clips")
        have = {i.name: i for i in ds.describe_indices()}
        rows = ds.count_rows(filter=f"{VECTOR_COLUMN} IS NOT NULL") if VECTOR_COLUMN in ds.schema.names else 0
        done: dict = {"rows_with_embedding": rows, "scalar": []}
        for column, kind in SCALAR_INDEXES.items():
            if column in ds.schema.names and f"{column}_idx" not in have:
                ds.create_scalar_index(column, kind, name=f"{column}_idx")
                done["scalar"].append(column)
        scalar = [name for name in have if name != VECTOR_INDEX]
        if scalar:
            lake.dataset("clips").optimize.optimize_indices(index_names=scalar)  # new fragments join them
        ds = lake.dataset("clips")
        if VECTOR_INDEX in have:
            indexed = int(have[VECTOR_INDEX].num_rows_indexed or rows)
            wanted = vector_index_settings(rows, ds.schema.field(VECTOR_COLUMN).type.list_size).index_type
            if (rows > retrain_growth * max(indexed, 1) or len(have[VECTOR_INDEX].segments) >= MAX_DELTAS
                    or have[VECTOR_INDEX].index_type != wanted):  # an index of the kind we used to build
                settings = create_vector_index(ds, rows)
                done["vector"] = f"{settings.index_type} retrained on {rows} rows ({settings.partitions} partitions)"
            else:
                ds.optimize.optimize_indices(index_names=[VECTOR_INDEX], num_indices_to_merge=0)
                kind = have[VECTOR_INDEX].index_type
                done["vector"] = f"{kind} updated ({rows} rows, new rows in a delta segment)"
        elif rows >= min_rows:
            settings = create_vector_index(ds, rows)
            done["vector"] = f"{settings.index_type} trained on {rows} rows ({settings.partitions} partitions)"
        else:
            done["vector"] = f"exact search ({rows} rows < {min_rows})"
    done["elapsed_s"] = round(time.time() - t0, 2)
    return done


def create_vector_index(ds, rows: int) -> VectorIndexSettings:
    """(Re)build the vector index with the settings `rows` calls for."""
    settings = vector_index_settings(rows, ds.schema.field(VECTOR_COLUMN).type.list_size)
    extra = {"num_sub_vectors": settings.num_sub_vectors} if settings.index_type == "IVF_PQ" else {}
    ds.create_index(VECTOR_COLUMN, index_type=settings.index_type, name=VECTOR_INDEX, metric="cosine", replace=True,
                    num_partitions=settings.partitions, **extra)
    return settings
