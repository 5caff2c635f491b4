"""Indexes on the clips table, built after a build: Lance's own vector and scalar indexes.

Below `min_rows` embeddings there is no vector index: an exact scan of a few thousand vectors takes
milliseconds and is exact, and IVF_PQ needs rows to train its centroids and codebooks. Above it, an
IVF_PQ index (cosine); later builds add their rows to the existing partitions (Lance's
optimize_indices) and the index is retrained once the table has grown `retrain_growth` times since
training. Scalar indexes cover the columns people filter on.
"""

from __future__ import annotations

import time

from gr2.lake.lake import Lake

VECTOR_COLUMN = "embedding"
VECTOR_INDEX = "embedding_idx"
MIN_ROWS = 10_000
SCALAR_INDEXES = {
    "clip_id": "BTREE",  # --like lookups and the committer's merge on id
    "video_id": "BTREE",
    "status": "BITMAP",
    "dataset": "BITMAP",
    "caption_source": "BITMAP",
    "clip_model": "BITMAP",
    "build_id": "BITMAP",
    "duration_s": "BTREE",
    "text_score": "BTREE",
}


def build_indexes(lake: Lake, min_rows: int = MIN_ROWS, target_partition_size: int | None = None,
                  num_sub_vectors: int | None = None, retrain_growth: float = 4.0) -> dict:
    """Create or update the clips table's indexes; returns what was done (for the build artifact)."""
    if not lake.exists("clips"):
        return {"vector": "none (no clips table)", "scalar": []}
    t0 = time.time()
    with lake.lease():
        ds = lake.dataset("clips")
        have = {i.name: i for i in ds.describe_indices()}
        rows = ds.count_rows(filter=f"{VECTOR_COLUMN} IS NOT NULL") if VECTOR_COLUMN in ds.schema.names else 0
        done: dict = {"rows_with_embedding": rows, "scalar": []}
        for column, kind in SCALAR_INDEXES.items():
            if column in ds.schema.names and f"{column}_idx" not in have:
                ds.create_scalar_index(column, kind, name=f"{column}_idx")
                done["scalar"].append(column)
        if have:
            ds = lake.dataset("clips")
            ds.optimize.optimize_indices()  # new fragments join every existing index
        ds = lake.dataset("clips")
        if VECTOR_INDEX in have:
            indexed = int(have[VECTOR_INDEX].num_rows_indexed or rows)
            if rows > retrain_growth * max(indexed, 1):
                _create_vector_index(ds, rows, target_partition_size, num_sub_vectors)
                done["vector"] = f"IVF_PQ retrained on {rows} rows"
            else:
                done["vector"] = f"IVF_PQ updated ({rows} rows)"
        elif rows >= min_rows:
            _create_vector_index(ds, rows, target_partition_size, num_sub_vectors)
            done["vector"] = f"IVF_PQ trained on {rows} rows"
        else:
            done["vector"] = f"exact search ({rows} rows < {min_rows})"
    done["elapsed_s"] = round(time.time() - t0, 2)
    return done


def _create_vector_index(ds, rows: int, target_partition_size: int | None, num_sub_vectors: int | None) -> None:
    dim = ds.schema.field(VECTOR_COLUMN).type.list_size
    # ~sqrt(rows) partitions; 16 dimensions per PQ sub-vector (32 bytes a 512-d vector).
    target = target_partition_size or max(256, int(rows ** 0.5))
    subvectors = num_sub_vectors or max(1, dim // 16)
    ds.create_index(VECTOR_COLUMN, index_type="IVF_PQ", name=VECTOR_INDEX, metric="cosine", replace=True,
                    target_partition_size=target, num_sub_vectors=subvectors)
