"""A lease on a lake in object storage: one committer at a time, across machines.

S3's conditional writes do the locking: `PutObject If-None-Match: *` creates the lease object only
when nobody holds it, `If-Match: <etag>` takes over an expired lease only if nobody else took it
first, and release deletes it only if it is still ours. While held, a heartbeat renews the lease
every `ttl_s / 4`, so a long commit keeps it; a holder that dies stops renewing and its lease
expires after `ttl_s`, so a killed build holds up the next one for seconds, never for good.
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
    )


def _split(root: str) -> tuple[str, str]:
    bucket, _, prefix = root[len("s3://"):].partition("/")
    return bucket, (prefix.rstrip("/") + "/_lease.json").lstrip("/")


@contextlib.contextmanager
def object_store_lease(root: str, opts: dict, timeout_s: float = 600.0, ttl_s: float = 20.0) -> Iterator[None]:
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
        body = json.dumps({"owner": me, "expires_at": time.time() + ttl_s}).encode()
        try:
            etag = s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
            break
        except ClientError as e:
            if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
        try:
            current = s3.get_object(Bucket=bucket, Key=key)
            holder = json.loads(current["Body"].read())
            if holder.get("expires_at", 0) < time.time():
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

    def heartbeat():
        while not stop.wait(ttl_s / 4):
            body = json.dumps({"owner": me, "expires_at": time.time() + ttl_s}).encode()
            try:
                held["etag"] = s3.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=held["etag"])["ETag"]
            except ClientError:  # lost it (we stalled past ttl_s): nothing to renew
                return

    beat = threading.Thread(target=heartbeat, daemon=True, name="gr2-lease-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(ClientError):  # already expired and taken over: nothing of ours to delete
            s3.delete_object(Bucket=bucket, Key=key, IfMatch=held["etag"])


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
