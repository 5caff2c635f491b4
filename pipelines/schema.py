"""The lake's Arrow schemas: the one module every reader and writer asks.

Column names carry their units (`duration_s`, `start_frame`, `width`). Large arrays are typed:
embeddings are fixed-size float lists, VQ tokens uint16 lists with their grid shape beside them,
thumbnails JPEG bytes. Nothing is pickled.
"""

from __future__ import annotations

import pyarrow as pa

STATUSES = ("accepted", "rejected", "failed")

# Tables and the column each one merges on.
TABLE_IDS = {
    "videos": "video_id",
    "clips": "clip_id",
    "builds": "build_id",
    "episodes": "episode_id",
    "steps": "step_id",
}

VIDEOS = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),  # sha256 of the file bytes (or of the uri when unreadable)
        pa.field("uri", pa.string(), nullable=False),
        pa.field("bytes", pa.int64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),  # null when accepted; "gate:score" or the error otherwise
        pa.field("container", pa.string()),
        pa.field("codec", pa.string()),
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()),
        pa.field("frame_count", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("rotation", pa.int32()),
        pa.field("has_audio", pa.bool_()),
        pa.field("decoder", pa.string()),  # decord | pyav: which decoder read the frames
        pa.field("caption", pa.string()),  # from the source, when it gave one
        pa.field("dataset", pa.string()),  # source dataset name, when the source gave one
        pa.field("shot_count", pa.int32()),
        pa.field("clip_count", pa.int32()),
        pa.field("config_hash", pa.string()),
        pa.field("build_id", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC")),
    ]
)

# Every gate's score has its own column, so a data scientist can re-threshold without re-running.
CLIP_SCORES = ("black_score", "blank_score", "motion_score")

CLIPS = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),  # from video_id and the frame span
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("shot_index", pa.int32()),
        pa.field("start_frame", pa.int64()),
        pa.field("end_frame", pa.int64()),  # exclusive
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("black_score", pa.float32()),  # mean luma of the sampled frames, 0..255
        pa.field("blank_score", pa.float32()),  # mean per-frame luma std, 0..255 (low = flat colour)
        pa.field("motion_score", pa.float32()),  # mean abs difference between sampled frames, 0..255
        pa.field("sampled_frames", pa.list_(pa.int64())),  # frame indices the clip's frames came from
        pa.field("thumbnail", pa.binary()),  # JPEG of the middle sampled frame
        pa.field("caption", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("build_id", pa.string(), nullable=False),
    ]
)

BUILDS = pa.schema(
    [
        pa.field("build_id", pa.string(), nullable=False),
        pa.field("flow", pa.string()),  # build-videos | ingest-robot | ...
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("sources", pa.list_(pa.string())),
        pa.field("config_json", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("funnel_json", pa.string()),  # the funnel printed by `gr2 status`
        pa.field("versions_json", pa.string()),  # {table: lance version} this build committed
    ]
)

SCHEMAS: dict[str, pa.Schema] = {"videos": VIDEOS, "clips": CLIPS, "builds": BUILDS}


def empty(table: str) -> pa.Table:
    """An empty table with the schema of `table`."""
    return SCHEMAS[table].empty_table()


def conform(table: str, rows: list[dict] | pa.Table) -> pa.Table:
    """Rows as an Arrow table with exactly `table`'s schema (missing columns null, extras an error)."""
    schema = SCHEMAS[table]
    if isinstance(rows, pa.Table):
        extra = set(rows.column_names) - set(schema.names)
        if extra:
            raise ValueError(f"{table}: columns not in the schema: {sorted(extra)}")
        cols = [
            rows.column(f.name).cast(f.type) if f.name in rows.column_names else pa.nulls(len(rows), f.type)
            for f in schema
        ]
        return pa.Table.from_arrays(cols, schema=schema)
    for row in rows:
        extra = set(row) - set(schema.names)
        if extra:
            raise ValueError(f"{table}: columns not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist(list(rows), schema=schema)
