"""The lake: Lance tables under one root URI, and the only code that writes them.

Exactly-once rests on Lance itself: every table's id is declared its primary key (schema.py), so
two committers merging the same new ids at once conflict and Lance retries the later merge against
the earlier one's rows; every id lands once, with no lock of ours (tests/test_reliability.py runs
four processes at it, on disk and on S3). Without the declaration the same race inserts both, and
so does a merge that goes through a scalar index on the id (both kept under test). Each table's id
has a BTREE index for lookups by id; merges do not use it (see `commit`), and `compact` folds the
small fragments many commits leave behind.

The one lease left (`lease`) keeps two processes from doing the same expensive, idempotent work at
once: training the vector index, writing a dataset's statistics. Rows never depend on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import lance
import pyarrow as pa
import pyarrow.compute as pc

from gr2.errors import Gr2Error
from gr2.lake import models, schema
from gr2.lake.uri import is_remote, local_path, storage_options

KEEP_VERSIONS = timedelta(days=7)  # versions (and unnamed files) younger than this are never cleaned up
COMPACT_AT_FRAGMENTS = 32  # a build or ingest compacts a table it wrote once it has this many fragments
# Rows per fragment after compaction. Lance rewrites every fragment below the target, so at its default
# (1M rows) a clips table's one part-full 1M-row fragment (~16 GB of rows with their thumbnails and
# previews) was rewritten by each compaction (benchmarks/lake_scale.py); 128k rows is ~2 GB.
COMPACT_ROWS = 128 * 1024
COMMIT_RETRIES = 20  # Lance's retries of a merge that conflicted with a concurrent commit (its default: 10)


def id_index(table: str) -> str:
    return f"{schema.TABLE_IDS[table]}_idx"


class LakeError(Gr2Error):
    """A lake that cannot be opened, read or written."""


# Where the object store is, which a Ray worker needs to reach the driver's: never a secret. Keys
# and tokens are not passed on: a runtime_env's variables show in Ray's dashboard and state API, so
# workers take credentials from their own environment, profile or instance role, as any AWS client.
_WORKER_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# Ray Data starts a pool's actors with max_restarts=-1, and Ray then logs an error line (once per
# process) that a restart could fail, the actor's constructor arguments being in the object store
# (ray-project/ray#53727; every actor pool does it, measured). gr2 never restarts a stage's actor: a
# dead one fails its build or ingest, whose re-run resumes from the lake (a restarted dedup actor
# would even forget the clips it had seen). Ray Data 2.60 takes max_restarts only through
# `ray_remote_args`, which it calls deprecated with no named parameter for it yet, so that one
# warning is filtered (when the args are made: Ray's import puts its own filters first).


def actor_args() -> dict:
    """Ray remote args for a stage's actor pool: never restarted, with the workers' store settings."""
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")  # an identical filter is replaced
    return {"max_restarts": 0, **worker_env()}


def worker_env() -> dict:
    """Ray remote args that carry the driver's object-store location (endpoint, region, profile) to
    the workers of a stage, so a stage reads the store the driver means. Credentials are the
    workers' own (see _WORKER_ENV). Empty when none are set, so local-only runs keep Ray's default
    worker pool.
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
        except (ValueError, FileNotFoundError):  # Lance: "Dataset at path ... was not found"
            return False
        except OSError as e:  # the store failed to answer: a table it holds must never look absent
            raise self._store_error(f"open {table}", e) from None

    def dataset(self, table: str, version: int | str | None = None) -> lance.LanceDataset:
        """The Lance dataset of `table` at `version` (a number or a tag; default: latest)."""
        try:
            return lance.dataset(self.uri(table), version=version, storage_options=self._opts)
        except (ValueError, FileNotFoundError) as e:
            raise LakeError(f"no table {table!r} in lake {self.root} ({e})") from None
        except OSError as e:
            raise self._store_error(f"open {table}", e) from None

    def read(self, table: str, columns: list[str] | None = None, filter: str | None = None,
             version: int | str | None = None) -> pa.Table:
        """`table` as Arrow (empty with the right schema when the table does not exist yet)."""
        if not self.exists(table):
            empty = schema.empty(table) if table in schema.SCHEMAS else pa.table({})
            return empty.select(columns) if columns else empty
        return self.dataset(table, version).to_table(columns=columns, filter=filter)

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator:
        """Exclusive right to do once-only work on this lake (training its vector index, writing
        statistics), across processes; commits never need it. Yields, on object storage, the lease
        (`.lost` is set if it was taken over meanwhile)."""
        if not self.is_local:
            from gr2.lake.lease import LeaseTimeout, object_store_lease

            try:
                lease = object_store_lease(self.root, self._opts, timeout_s=self.lease_timeout_s)
                held = lease.__enter__()
            except LeaseTimeout as e:
                raise LakeError(str(e)) from None
            try:
                yield held
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
                yield None  # a local lock is held until released: nothing can take it over
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def commit(self, table: str, rows: list[dict] | pa.Table, update: bool = True) -> int:
        """Merge `rows` into `table` on its primary key; returns the table's new version.

        `update=False` keeps rows already in the table untouched (insert only the new ids).
        """
        key = schema.TABLE_IDS[table]
        data = schema.conform(table, rows) if table in schema.SCHEMAS else _as_table(rows)
        if len(data) == 0:
            return self.dataset(table).version if self.exists(table) else 0
        data = _last_per_id(data, key)
        if not self.exists(table):
            # Created empty and exclusively (see _create), then merged like any other commit: when
            # the table's first rows were written by the create itself, two builds starting at once
            # could both "create" it, and a failed input's video row vanished.
            self._create(table, data.schema)
        # use_index(False): merged through the id's BTREE index, Lance (pylance 14) records no inserted
        # keys for conflict detection, and two concurrent merges of one new id both insert it (tested
        # in tests/test_reliability.py; lance PR 9238 is the open fix). The full scan keeps every id once.
        merge = self._keyed(table).merge_insert(key).use_index(False)
        if update:
            merge = merge.when_matched_update_all()
        # A conflicting concurrent commit is re-read and the merge re-run against it, this many times.
        try:
            merge.when_not_matched_insert_all().conflict_retries(COMMIT_RETRIES).execute(data)
        except OSError as e:  # nothing committed: the table stays at its last version
            raise self._store_error(f"commit {len(data)} rows to {table}", e) from None
        return self.dataset(table).version

    @contextlib.contextmanager
    def storage_errors(self, doing: str) -> Iterator[None]:
        """Lance's storage errors inside the block as one-line LakeErrors saying what we were `doing`."""
        try:
            yield
        except OSError as e:
            raise self._store_error(doing, e) from None

    def _store_error(self, doing: str, e: OSError) -> LakeError:
        """One line naming the lake, what failed and why, for a storage error the clients' own retries
        did not get past (see gr2.lake.uri.Retries): a full disk, a store that kept failing."""
        text = " ".join(str(e).split())
        if getattr(e, "errno", None) == errno.ENOSPC or "no space left" in text.lower():
            return LakeError(f"lake {self.root}: no space left on device to {doing}; free space and run again")
        return LakeError(f"lake {self.root}: could not {doing}: {text[:300]}")

    def _create(self, table: str, schema_: pa.Schema) -> None:
        """Create `table` empty, with `schema_`, and index its id; nothing if another committer made it.

        An Overwrite of no rows committed with no retry: `write_dataset(mode="create")` that loses a
        race retries itself as an Overwrite of the winner's table (pylance 14: 2 of 30 races, local),
        which would wipe rows merged in between; committed without a retry, the loser only fails.
        """
        uri = self.uri(table)
        try:
            ds = lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema_, []), max_retries=0,
                                           enable_v2_manifest_paths=True, storage_options=self._opts)
        except (OSError, ValueError) as e:
            for _ in range(20):  # the winner's first version may still be on its way
                if self.exists(table):
                    return
                time.sleep(0.25)
            if isinstance(e, OSError):
                raise self._store_error(f"create {table}", e) from None
            raise LakeError(f"cannot create {table} in lake {self.root}: {e}") from None
        with contextlib.suppress(OSError, ValueError):  # a concurrent creator indexed it already
            ds.create_scalar_index(schema.TABLE_IDS[table], "BTREE", name=id_index(table))

    def _keyed(self, table: str) -> lance.LanceDataset:
        """`table`, its id declared the primary key: a table written before gr2 declared one is
        migrated in place (a metadata-only commit), once."""
        ds = self.dataset(table)
        key = schema.TABLE_IDS[table]
        field = ds.schema.field(key)
        if (field.metadata or {}).get(b"lance-schema:unenforced-primary-key") == b"true":
            return ds
        if field.nullable:
            raise LakeError(f"{self.uri(table)}: its id {key!r} is nullable, so Lance cannot take it as the primary "
                            f"key that keeps commits exactly-once; rebuild this lake with this version of gr2")
        logging.getLogger("gr2.lake").info("%s: declaring %s its primary key (a lake from before gr2 did)",
                                           self.uri(table), key)
        ds.update_field_metadata({key: schema.PRIMARY_KEY})
        return self.dataset(table)

    def compact(self, tables: tuple[str, ...] | None = None, older_than: timedelta = KEEP_VERSIONS,
                min_fragments: int = 2) -> dict[str, dict]:
        """Fold each table's small fragments into large ones, bring its indexes up to date, and delete
        versions older than `older_than` that no build tag holds; what it did, per table.

        Safe beside a running build: compaction commits like any other writer, so Lance either
        rebases a concurrent merge onto it or turns the compaction away (then the table is as it
        was, and this says so). The cleanup is safe beside one while `older_than` is longer than a
        writer holds the version it read (KEEP_VERSIONS, a week): with 0, a merge in flight lost
        files its read still needed and failed (its rows stay for the re-run). Safe to kill: a compaction that never committed leaves only files no
        version names, and cleanup deletes unnamed files only once they are older than `older_than`,
        so another writer's files still in flight are never taken (lance issue 7207 is what the
        opposite costs). A table with fewer than `min_fragments` fragments is not rewritten.
        """
        done: dict[str, dict] = {}
        # Under the lease, as index building is: Lance retries neither an index update nor a
        # compaction that a concurrent one preempted (two builds ending at once failed that way).
        with self.lease():
            for table in tables or tuple(schema.TABLE_IDS):
                if self.exists(table):
                    with self.storage_errors(f"compact {table}"):
                        done[table] = self._compact_table(table, older_than, min_fragments)
        return done

    def _compact_table(self, table: str, older_than: timedelta, min_fragments: int) -> dict:
        """One table's compaction (see `compact`); what it did."""
        ds = self._keyed(table)
        report = {"fragments_before": len(ds.get_fragments()), "version_before": ds.version}
        try:
            if id_index(table) not in {i.name for i in ds.describe_indices()}:
                ds.create_scalar_index(schema.TABLE_IDS[table], "BTREE", name=id_index(table))
            # indexes first: Lance compacts only fragments an index covers alike, so fragments
            # committed since the last index update would otherwise stay apart
            self.dataset(table).optimize.optimize_indices()
            if report["fragments_before"] >= min_fragments:
                metrics = self.dataset(table).optimize.compact_files(target_rows_per_fragment=COMPACT_ROWS)
                report["fragments_removed"] = metrics.fragments_removed
        except (OSError, ValueError, RuntimeError) as e:  # a conflicting commit won: nothing lost
            report["skipped"] = " ".join(str(e).split())[:200]
        cleaned = self.dataset(table).cleanup_old_versions(older_than=older_than, error_if_tagged_old_versions=False)
        ds = self.dataset(table)
        report.update(fragments_after=len(ds.get_fragments()), version_after=ds.version,
                      versions_removed=cleaned.old_versions, bytes_removed=cleaned.bytes_removed)
        return report

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
        try:
            self._keyed(table).merge_insert(key).when_matched_update_all().conflict_retries(COMMIT_RETRIES).execute(rows)
        except OSError as e:
            raise self._store_error(f"update {len(rows)} rows of {table}", e) from None
        return self.dataset(table).version

    def tag(self, table: str, name: str, version: int | None = None) -> None:
        """Tag `table`'s `version` (default: latest) as `name`; re-tagging moves the tag."""
        ds = self.dataset(table)
        version = version or ds.version
        # Tag names are build ids, one writer each; Lance refuses a second create of a name.
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
