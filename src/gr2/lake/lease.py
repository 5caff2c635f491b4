"""A lease on a lake in object storage: one process at a time doing work worth doing once.

Rows never depend on it (Lance's primary keys keep commits exactly-once, lake.py); it only keeps two
builds from training the same vector index or writing the same statistics at once.

S3's conditional writes do the locking: `PutObject If-None-Match: *` creates the lease object only
when nobody holds it, `If-Match: <etag>` takes over an expired lease only if nobody else took it
first, and release deletes it only if it is still ours. Before trusting a store with that, the
first lease checks it refuses a second `If-None-Match` write (a store that ignores the condition
would let everyone in). Expiry is judged on the store's clock (the object's Last-Modified against
the response's Date), never on one machine's against another's. While held, a heartbeat renews the
lease every `ttl_s / 4`, retrying a failed renewal until the lease would expire; a lease taken
over meanwhile is reported to the holder (`Held.lost`), who is told rather than left to believe it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from gr2.errors import Gr2Error
from gr2.lake.uri import botocore_config

log = logging.getLogger("gr2.lake")


class LeaseTimeout(Gr2Error):
    """The lake stayed leased by someone else for longer than we were willing to wait."""


def _client(opts: dict):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=opts.get("aws_endpoint") or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=opts.get("aws_region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=opts.get("aws_access_key_id"),
        aws_secret_access_key=opts.get("aws_secret_access_key"),
        aws_session_token=opts.get("aws_session_token"),
        config=botocore_config(),
    )


def _split(root: str) -> tuple[str, str]:
    bucket, _, prefix = root[len("s3://"):].partition("/")
    return bucket, (prefix.rstrip("/") + "/_lease.json").lstrip("/")


class Held:
    """A held lease: `lost` is set when someone else took it over while we held it."""

    def __init__(self):
        self.lost = threading.Event()


_CHECKED_STORES: set[tuple] = set()


def _check_conditional_writes(s3, bucket: str, key: str, etag: str) -> str:
    """Refuse a store that ignores If-None-Match (moto and S3 honour it); returns the lease's etag."""
    from botocore.exceptions import ClientError

    store = (s3.meta.endpoint_url, bucket)
    if store in _CHECKED_STORES:
        return etag
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=b"{}", IfNoneMatch="*")
    except ClientError as e:
        if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict"):
            _CHECKED_STORES.add(store)
            return etag
        raise
    raise LeaseTimeout(f"the object store at {store[0] or 'S3'} (bucket {bucket}) does not honour conditional writes "
                       "(a second If-None-Match put succeeded): gr2 cannot hold a lease there")


def _expired(current: dict, ttl_s: float) -> bool:
    """Whether the lease object is older than `ttl_s`, judged by the store's own clock."""
    from email.utils import parsedate_to_datetime

    date = current.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date).timestamp() if date else time.time()
    return current["LastModified"].timestamp() + ttl_s < now


@contextlib.contextmanager
def object_store_lease(root: str, opts: dict, timeout_s: float = 600.0, ttl_s: float = 20.0) -> Iterator[Held]:
    """Hold the lease of the lake at `root` (s3://bucket/prefix) for the body of the with-block."""
    from botocore.exceptions import ClientError

    if not root.startswith("s3://"):
        raise ValueError(f"leases on {root.split('://')[0]}:// lakes are not supported; use s3:// or a local path")
    s3 = _client(opts)
    bucket, key = _split(root)
    me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    etag, holder, waited = None, None, False
    while etag is None:
        body = json.dumps({"owner": me}).encode()
        try:
            etag = s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
            etag = _check_conditional_writes(s3, bucket, key, etag)
            break
        except ClientError as e:
            if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
        try:
            current = s3.get_object(Bucket=bucket, Key=key)
            holder = json.loads(current["Body"].read())
            if holder.get("owner") == me:  # our put was applied and its reply lost; the retry found it there
                etag = current["ETag"]
                break
            if _expired(current, ttl_s):
                etag = s3.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=current["ETag"])["ETag"]
                break
        except ClientError as e:
            if _code(e) not in ("NoSuchKey", "PreconditionFailed", "ConditionalRequestConflict", "404"):
                raise
        if not waited:
            log.warning("lake %s is being written by %s; waiting for its lease (up to %.0f s)",
                        root, holder and holder.get("owner"), timeout_s)
            waited = True
        if time.monotonic() > deadline:
            raise LeaseTimeout(f"lake {root} stayed leased by {holder and holder.get('owner')} for {timeout_s:.0f}s")
        time.sleep(0.1)
    held = {"etag": etag}
    stop = threading.Event()
    lease = Held()

    def heartbeat():
        renewed = time.monotonic()
        while not stop.wait(ttl_s / 4):
            try:
                held["etag"] = s3.put_object(Bucket=bucket, Key=key, Body=json.dumps({"owner": me}).encode(),
                                             IfMatch=held["etag"])["ETag"]
                renewed = time.monotonic()
            except ClientError as e:
                if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict") and _still_ours(s3, bucket, key, me, held):
                    renewed = time.monotonic()  # the renewal was applied and its reply lost: botocore's retry met it
                    continue
                if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict") or time.monotonic() - renewed > ttl_s:
                    log.error("lost the lease of lake %s (%s): another process may be doing the same work", root,
                              _code(e) or e)
                    lease.lost.set()
                    return
                # a transient failure (a 500, a throttle): try again at the next beat, while the lease lasts

    beat = threading.Thread(target=heartbeat, daemon=True, name="gr2-lease-heartbeat")
    beat.start()
    try:
        yield lease
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(ClientError):  # already expired and taken over: nothing of ours to delete
            s3.delete_object(Bucket=bucket, Key=key, IfMatch=held["etag"])


def _still_ours(s3, bucket: str, key: str, me: str, held: dict) -> bool:
    """Whether the lease object still names `me` as its owner (then `held` takes its etag)."""
    from botocore.exceptions import ClientError

    try:
        current = s3.get_object(Bucket=bucket, Key=key)
        if json.loads(current["Body"].read()).get("owner") == me:
            held["etag"] = current["ETag"]
            return True
    except (ClientError, ValueError):
        pass  # gone or unreadable: not ours to keep
    return False


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
