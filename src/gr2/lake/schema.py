"""The lake's Arrow schemas: the one module every reader and writer asks.

Column names carry their units (`duration_s`, `start_frame`, `width`). Large arrays are typed:
embeddings are fixed-size float lists, VQ tokens uint16 lists with their grid shape beside them,
thumbnails JPEG bytes. Nothing is pickled.
"""

from __future__ import annotations

import pyarrow as pa

# Tables and the column each one merges on.
# Lance's own marker of a primary key (unenforced: Lance does not reject a duplicate insert by itself).
# With it, two merge_inserts of the same new ids at once conflict and the later one is retried against
# the earlier's rows, so every id lands once with no lock of ours (DESIGN.md: four writers, local and S3).
PRIMARY_KEY = {"lance-schema:unenforced-primary-key": "true"}


def primary_key(name: str) -> pa.Field:
    """A table's id column: a non-null string declared as the table's primary key."""
    return pa.field(name, pa.string(), nullable=False, metadata=PRIMARY_KEY)


TABLE_IDS = {
    "videos": "video_id",
    "clips": "clip_id",
    "builds": "build_id",
    "inputs": "input_id",
    "episodes": "episode_id",
    "steps": "step_id",
}

VIDEOS = pa.schema(
    [
        primary_key("video_id"),  # sha256 of the file bytes (or of the uri when unreadable)
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

# CLIP image and text embeddings are fixed-size lists (what Lance's vector indexes need), so their
# width is part of the schema. A lake holds one CLIP model's embeddings; its width is read from the rows.
EMBEDDING_DIM = 512  # ViT-B-32 and coca_ViT-B-32; ViT-L-14 lakes are 768 wide


def clips_schema(embedding_dim: int = EMBEDDING_DIM) -> pa.Schema:
    """The clips schema with `embedding_dim`-wide embeddings (image and caption: one CLIP model's width)."""
    return with_widths("clips", {c: embedding_dim for c in VECTORS["clips"]})


def with_widths(table: str, widths: dict[str, int]) -> pa.Schema:
    """`table`'s schema with its vector columns `widths` wide (the others at their default width)."""
    return pa.schema([pa.field(f.name, pa.list_(pa.float32(), widths[f.name]), f.nullable) if f.name in widths else f
                      for f in SCHEMAS[table]])


def schema_for(table: str, rows: list[dict] | pa.Table, widths: dict[str, int] | None = None) -> pa.Schema:
    """`table`'s schema with each vector column as wide as `rows` carry it (else `widths`, else the default)."""
    found = dict(widths or {})
    for column in VECTORS.get(table, ()):
        if isinstance(rows, pa.Table):
            if column not in rows.column_names:
                continue
            t = rows.schema.field(column).type
            if pa.types.is_fixed_size_list(t):
                found[column] = t.list_size
                continue
            first = next((v for v in rows.column(column).to_pylist() if v is not None), None)
        else:
            first = next((r[column] for r in rows if r.get(column) is not None), None)
        if first is not None:
            found[column] = len(first)
    return with_widths(table, found) if found else SCHEMAS[table]


CLIPS = pa.schema(
    [
        primary_key("clip_id"),  # from video_id and the frame span
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
        pa.field("fingerprint", pa.list_(pa.uint64())),  # 64-bit pHash of each sampled frame (video/fingerprint.py)
        pa.field("thumbnail", pa.binary()),  # JPEG of the middle sampled frame
        pa.field("caption", pa.string()),
        pa.field("caption_source", pa.string()),  # source | coca | none (none: flagged uncaptioned)
        pa.field("caption_model", pa.string()),  # "coca_ViT-B-32/<weights>" when caption_source is coca
        pa.field("dataset", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),  # mean of the frames' CLIP embeddings, L2-normalised
        pa.field("clip_model", pa.string()),  # open_clip model name, e.g. ViT-B-32
        pa.field("clip_pretrained", pa.string()),  # weights: an open_clip tag, a checkpoint path, or "none" (random init)
        pa.field("text_score", pa.float32()),  # CLIP cosine between the caption and the embedding; null uncaptioned
        # The caption's text embedding, what training conditions on; null uncaptioned. The text model
        # and its weights ("none": a seeded random-init tower) are recorded beside it, null with it.
        pa.field("caption_embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
        pa.field("text_model", pa.string()),
        pa.field("text_pretrained", pa.string()),
        pa.field("duplicate_of", pa.string()),  # clip_id of the earlier clip this one near-duplicates
        pa.field("duplicate_distance", pa.float32()),  # to it: mean differing fingerprint bits, or cosine distance (the reason says which)
        pa.field("preview", pa.binary()),  # animated WebP of the sampled frames, small (the gallery's preview)
        pa.field("tokenizer_id", pa.string()),  # checkpoint id of `tokens`; null: not tokenized
        pa.field("tokens", pa.list_(pa.uint16())),  # VQ token grid [T, h, w] of the sampled frames, row-major
        pa.field("token_shape", pa.list_(pa.int32(), 3)),  # (T, h, w) of `tokens`
        pa.field("config_hash", pa.string()),
        pa.field("build_id", pa.string(), nullable=False),
    ]
)

BUILDS = pa.schema(
    [
        primary_key("build_id"),
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

# Every input a build was given, as given: two uris with the same bytes are one video (one row in
# videos, its clips once) but two inputs here, each with its own manifest caption and dataset.
INPUTS = pa.schema(
    [
        primary_key("input_id"),  # of the uri and the video its bytes are
        pa.field("uri", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("caption", pa.string()),  # the manifest's caption for this uri
        pa.field("dataset", pa.string()),
        pa.field("build_id", pa.string(), nullable=False),  # the build that first saw this uri with these bytes
        pa.field("seen_at", pa.timestamp("us", tz="UTC")),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {"videos": VIDEOS, "clips": CLIPS, "builds": BUILDS, "inputs": INPUTS}

# Fixed-size float vectors (what Lance's vector indexes need): their width is the model's, read from the rows.
VECTORS = {"clips": ("embedding", "caption_embedding"), "episodes": ("instruction_embedding",)}


def concat(table: str, tables: list[pa.Table]) -> pa.Table:
    """`tables` of `table` as one; a vector column holding only nulls takes the width the others carry
    (a row written where the model's width is not known, e.g. an unlistable source's)."""
    widths = {c: t.schema.field(c).type.list_size for t in tables for c in VECTORS.get(table, ())
              if c in t.column_names and t.column(c).null_count < len(t)}
    out = []
    for t in tables:
        for c, w in widths.items():
            if c in t.column_names and t.column(c).null_count == len(t) and t.schema.field(c).type.list_size != w:
                i = t.schema.get_field_index(c)
                t = t.set_column(i, pa.field(c, pa.list_(pa.float32(), w)), pa.nulls(len(t), pa.list_(pa.float32(), w)))
        out.append(t)
    return pa.concat_tables(out)


def empty(table: str) -> pa.Table:
    """An empty table with the schema of `table`."""
    return SCHEMAS[table].empty_table()


def conform(table: str, rows: list[dict] | pa.Table, widths: dict[str, int] | None = None) -> pa.Table:
    """Rows as an Arrow table with exactly `table`'s schema (missing columns null, extras an error).

    widths: vector columns' widths where no row carries one (a text model's, for rows without text)."""
    schema = schema_for(table, rows, widths)
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


# -- Robot trajectories (pipelines/robot) -------------------------------------------------------

# One entry per camera: how its clock was mapped onto the state stream's (pipelines/robot/align.py).
ALIGNMENT_REPORT = pa.struct(
    [
        pa.field("camera", pa.string()),
        pa.field("fps", pa.float64()),  # declared by the source, else from the median frame interval
        pa.field("frame_count", pa.int64()),
        pa.field("offset_s", pa.float64()),  # camera clock minus state clock (its latency)
        pa.field("offset_source", pa.string()),  # declared (config) | estimated | dataset (its metadata) | none
        pa.field("tolerance_s", pa.float64()),
        pa.field("max_skew_s", pa.float64()),  # over the steps that got a frame
        pa.field("mean_abs_skew_s", pa.float64()),
        pa.field("dropped_frames", pa.int32()),  # gaps in the camera's timestamps, in frame periods
        pa.field("flagged_steps", pa.int32()),  # steps with no frame of this camera within tolerance
    ]
)

# One dimension of a state or action vector, as its reader declared it (robot/layout.py).
LAYOUT = pa.list_(pa.struct([
    pa.field("name", pa.string()),
    pa.field("unit", pa.string()),  # "m", "rad", "1" (a ratio or a command without unit), "" unknown
    pa.field("mode", pa.string()),  # absolute | delta
    pa.field("gripper", pa.string()),  # null | binary | continuous
    pa.field("low", pa.float64()),  # the declared range; a binary gripper's two values
    pa.field("high", pa.float64()),
]))

EPISODES = pa.schema(
    [
        primary_key("episode_id"),  # sha256 of the episode's content (of its uri when unreadable)
        pa.field("source", pa.string(), nullable=False),  # the dataset's root uri
        pa.field("episode_key", pa.string(), nullable=False),  # the episode within its source
        pa.field("format", pa.string()),  # lerobot | hdf5-robomimic | hdf5-aloha | calvin | annotated-json
        pa.field("dataset", pa.string()),  # name normalisation statistics are grouped by
        pa.field("instruction", pa.string()),
        # The instruction's text embedding, what training and the policy condition on; null without an
        # instruction. The text model and its weights ("none": a seeded random-init tower) beside it.
        pa.field("instruction_embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
        pa.field("text_model", pa.string()),
        pa.field("text_pretrained", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),  # null when accepted; "gate:score" or the error otherwise
        pa.field("length", pa.int32()),  # aligned steps
        pa.field("duration_s", pa.float64()),
        pa.field("state_fps", pa.float64()),
        pa.field("state_dim", pa.int32()),
        pa.field("action_dim", pa.int32()),
        pa.field("action_space", pa.string()),  # ee_delta (robot/actions.py) | native
        # What each dimension of steps.state, steps.action and steps.source_action is (robot/layout.py):
        # name, unit, absolute or delta, and which are grippers, binary or continuous.
        pa.field("state_layout", LAYOUT),
        pa.field("action_layout", LAYOUT),
        pa.field("source_action_layout", LAYOUT),
        pa.field("cameras", pa.list_(pa.string())),  # view order of steps.views
        pa.field("frame_width", pa.int32()),
        pa.field("frame_height", pa.int32()),
        pa.field("alignment", pa.list_(ALIGNMENT_REPORT)),
        pa.field("flagged_steps", pa.int32()),  # steps with at least one view flagged
        pa.field("tokenizer_id", pa.string()),  # checkpoint id of the token grids; null: none
        pa.field("config_hash", pa.string()),
        pa.field("build_id", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC")),
    ]
)

# One entry per camera, in the episode's `cameras` order. A view with no frame within tolerance
# has ok=false and no jpeg: flagged, never filled with a frame from the wrong time.
STEP_VIEW = pa.struct(
    [
        pa.field("camera", pa.string()),
        pa.field("ok", pa.bool_()),
        pa.field("jpeg", pa.binary()),
        pa.field("frame_index", pa.int64()),  # nearest frame in the camera's stream
        pa.field("timestamp_s", pa.float64()),  # that frame's time on the state clock (offset removed)
        pa.field("skew_s", pa.float32()),  # frame time minus step time
        pa.field("tokens", pa.list_(pa.uint16())),  # row-major token grid; null without a tokenizer
        pa.field("token_shape", pa.list_(pa.int32(), 2)),  # (h, w) of `tokens`
    ]
)

STEPS = pa.schema(
    [
        primary_key("step_id"),  # episode_id and step
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("timestamp_s", pa.float64()),  # on the state clock
        pa.field("state", pa.list_(pa.float32())),
        pa.field("action", pa.list_(pa.float32())),  # in episodes.action_space; null where undefined (last step of deltas)
        pa.field("source_action", pa.list_(pa.float32())),  # as the source recorded it
        pa.field("views", pa.list_(STEP_VIEW)),
        pa.field("flags", pa.list_(pa.string())),  # e.g. "view:gripperPOV", "action:none"; empty when clean
        pa.field("config_hash", pa.string()),
        pa.field("build_id", pa.string(), nullable=False),
    ]
)

SCHEMAS["episodes"] = EPISODES
SCHEMAS["steps"] = STEPS
