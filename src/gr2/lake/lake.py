"""The lake: Lance tables under one root URI, and the only code that writes them.

Idempotence never rests on Lance's merge_insert alone: two concurrent merge_inserts with the same
new ids both insert (measured with pylance 14, see DESIGN.md). Every write therefore goes through
`Lake.commit`, which holds the lake's lease while it merges, so one committer at a time touches a
table. Ray workers only ever produce rows; the driver commits them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import lance
import pyarrow as pa
import pyarrow.compute as pc

from gr2.errors import Gr2Error
from gr2.lake import models, schema
from gr2.lake.uri import is_remote, local_path, storage_options


class LakeError(Gr2Error):
    """A lake that cannot be opened, read or written."""


# The settings a Ray worker needs to reach the same object store as the driver.
_WORKER_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
               "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE")


def worker_env() -> dict:
    """Ray remote args that carry the driver's AWS settings to the workers of a stage.

    Workers are started with the environment Ray had when it started, and a cluster's workers never
    saw this driver's shell. A stage that reads s3:// sources or an s3:// lake runs with these
    settings, so credentials set after `ray.init` (a notebook, a test) reach it too. Empty when none
    are set, so local-only runs keep Ray's default worker pool.
    """
    env = {k: os.environ[k] for k in _WORKER_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


@dataclass
class Lake:
    """A lake rooted at `root` (a local directory or an object-store URI)."""

    root: str
    lease_timeout_s: float = 600.0
    _opts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/")
        if not is_remote(self.root):
            self.root = os.path.abspath(local_path(self.root))
        self._opts = storage_options(self.root)

    # -- reading -----------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return not is_remote(self.root)

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}.lance"

    def exists(self, table: str | None = None) -> bool:
        """Whether the lake (or one of its tables) has been written."""
        if table is None:
            return any(self.exists(t) for t in schema.TABLE_IDS)
        try:
            lance.dataset(self.uri(table), storage_options=self._opts)
            return True
        except (ValueError, FileNotFoundError, OSError):
            return False

    def dataset(self, table: str, version: int | str | None = None) -> lance.LanceDataset:
        """The Lance dataset of `table` at `version` (a number or a tag; default: latest)."""
        try:
            return lance.dataset(self.uri(table), version=version, storage_options=self._opts)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise LakeError(f"no table {table!r} in lake {self.root} ({e})") from None

    def read(self, table: str, columns: list[str] | None = None, filter: str | None = None,
             version: int | str | None = None) -> pa.Table:
        """`table` as Arrow (empty with the right schema when the table does not exist yet)."""
        if not self.exists(table):
            empty = schema.empty(table) if table in schema.SCHEMAS else pa.table({})
            return empty.select(columns) if columns else empty
        return self.dataset(table, version).to_table(columns=columns, filter=filter)

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Exclusive right to commit to this lake, across processes."""
        if not self.is_local:
            from gr2.lake.lease import LeaseTimeout, object_store_lease

            try:
                lease = object_store_lease(self.root, self._opts, timeout_s=self.lease_timeout_s)
                lease.__enter__()
            except LeaseTimeout as e:
                raise LakeError(str(e)) from None
            try:
                yield
            finally:
                lease.__exit__(None, None, None)
            return
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, ".lease"), "a+") as f:
            deadline, waited = time.monotonic() + self.lease_timeout_s, False
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        logging.getLogger("gr2.lake").warning(
                            "lake %s is being written by another build; waiting for its lease (up to %.0f s)",
                            self.root, self.lease_timeout_s)
                        waited = True
                    if time.monotonic() > deadline:
                        raise LakeError(f"lake {self.root} stayed leased for {self.lease_timeout_s:.0f}s") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def commit(self, table: str, rows: list[dict] | pa.Table, update: bool = True) -> int:
        """Merge `rows` into `table` on its id; returns the table's new version.

        `update=False` keeps rows already in the table untouched (insert only the new ids).
        """
        key = schema.TABLE_IDS[table]
        data = schema.conform(table, rows) if table in schema.SCHEMAS else _as_table(rows)
        if len(data) == 0:
            return self.dataset(table).version if self.exists(table) else 0
        data = _last_per_id(data, key)
        with self.lease():
            if not self.exists(table):
                ds = lance.write_dataset(data, self.uri(table), storage_options=self._opts)
                return ds.version
            ds = self.dataset(table)
            merge = ds.merge_insert(key)
            if update:
                merge = merge.when_matched_update_all()
            merge.when_not_matched_insert_all().execute(data)
            return self.dataset(table).version

    def update(self, table: str, rows: pa.Table) -> int:
        """Set some columns of rows already in `table` (`rows` holds the id and those columns only).

        Rows whose id is not in the table are ignored: an update never inserts.
        """
        key = schema.TABLE_IDS[table]
        if key not in rows.column_names:
            raise ValueError(f"{table}: an update needs the id column {key!r}")
        if table in schema.SCHEMAS:
            target = schema.SCHEMAS[table]
            unknown = [c for c in rows.column_names if c not in target.names]
            if unknown:
                raise ValueError(f"{table}: columns not in the schema: {unknown}")
            rows = rows.cast(pa.schema([target.field(c) for c in rows.column_names]))
        rows = _last_per_id(rows, key)
        with self.lease():
            self.dataset(table).merge_insert(key).when_matched_update_all().execute(rows)
            return self.dataset(table).version

    def tag(self, table: str, name: str, version: int | None = None) -> None:
        """Tag `table`'s `version` (default: latest) as `name`; re-tagging moves the tag."""
        ds = self.dataset(table)
        version = version or ds.version
        with self.lease():
            if name in ds.tags.list():
                ds.tags.update(name, version)
            else:
                ds.tags.create(name, version)

    # -- the builds ledger -------------------------------------------------------------------------

    def record_build(self, build_id: str, flow: str, sources: list[str], config_json: str, config_hash: str,
                     funnel: dict, started: datetime, tables: tuple[str, ...]) -> dict[str, int]:
        """Tag every table a build touched with its id and write its row in `builds`; returns the
        {table: version} the row records."""
        versions = {}
        for table in tables:
            if self.exists(table):
                self.tag(table, build_id)
                versions[table] = self.dataset(table).version
        self.commit("builds", [{
            "build_id": build_id, "flow": flow, "started_at": started, "finished_at": datetime.now(timezone.utc),
            "sources": list(sources), "config_json": config_json, "config_hash": config_hash,
            "funnel_json": json.dumps(funnel), "versions_json": json.dumps(versions),
        }])
        return versions

    def latest_build(self, flow: str | None = None) -> dict | None:
        """The most recently finished build (optionally of one flow), with its funnel decoded."""
        builds = self.read("builds")
        if flow is not None and len(builds):
            builds = builds.filter(pc.equal(builds["flow"], flow))
        if len(builds) == 0:
            return None
        row = builds.sort_by([("finished_at", "descending")]).slice(0, 1).to_pylist()[0]
        row["funnel"] = json.loads(row.pop("funnel_json") or "{}")
        row["config"] = json.loads(row.pop("config_json") or "{}")
        row["versions"] = json.loads(row.pop("versions_json") or "{}")
        return row

    # -- the models registry (models.py holds the layout) -------------------------------------------

    def models_dir(self, kind: str) -> str:
        """Where checkpoints of `kind` ("tokenizer" or "gr2") live."""
        return models.directory(self.root, kind)

    def checkpoints(self, kind: str) -> list[models.Saved]:
        """Every complete checkpoint of `kind` in the lake, oldest first."""
        return models.listing(self.root, kind)

    def find_checkpoint(self, kind: str, ref: str | None = None) -> str | None:
        """The directory of checkpoint `ref` of `kind` (an id or a unique prefix; None: the latest saved),
        or None when the lake has none such; LakeError when a prefix begins several ids."""
        found = self.checkpoints(kind)
        matches = found if ref is None else models.matching(found, ref)
        ids = sorted({s.checkpoint_id for s in matches})
        if ref is not None and len(ids) > 1:
            raise LakeError(f"{kind} {ref} is ambiguous under {self.models_dir(kind)}: it begins {', '.join(ids)}")
        return matches[-1].path if matches else None


def _as_table(rows: list[dict] | pa.Table) -> pa.Table:
    return rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))


def _last_per_id(data: pa.Table, key: str) -> pa.Table:
    """Keep one row per id (the last), so a batch never inserts an id twice."""
    ids = data.column(key).to_pylist()
    if len(set(ids)) == len(ids):
        return data
    last = {v: i for i, v in enumerate(ids)}
    return data.take(sorted(last.values()))
