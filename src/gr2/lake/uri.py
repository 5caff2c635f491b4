"""URIs: a lake, a source or a checkpoint is a local path or an object-store URI (s3://bucket/prefix).

The one place that tells the two apart, joins them, lists them and opens a filesystem on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def is_remote(uri: str) -> bool:
    """Whether `uri` names an object store (s3://, gs://, ...) rather than this machine's files."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A local `uri` as a plain path (file:// dropped); anything else unchanged."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def inside(root: str, relative: str) -> str:
    """`relative` under the local directory `root`; ValueError when it is absolute, a URI, or climbs
    out (`../`): a path a dataset's own metadata names must stay inside the dataset. Checked on the
    path as written, so a dataset's own symlinks (the Hugging Face cache's blobs) still resolve."""
    if os.path.isabs(relative) or is_remote(relative) or relative.startswith("file:"):
        raise ValueError(f"names {relative!r}, not a path inside the dataset")
    base = os.path.normpath(root)
    path = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([path, base]) != base:
        raise ValueError(f"names {relative!r}, which climbs out of the dataset")
    return path


@dataclass(frozen=True)
class Retries:
    """How every client gr2 reaches an object store with retries a failed request: 5xx replies
    (500, 503 SlowDown), reset connections and requests that outlive their timeout. One setting for
    the four clients gr2 uses on S3, each spelled in that client's own options (no retry loop of
    ours): Lance (object_store) in `storage_options`, pyarrow's S3FileSystem in `arrow_filesystem`,
    s3fs (fsspec) in `url_to_fs`, boto3 (the lake's lease) in `botocore_config`.
    """

    attempts: int = 10  # tries per request, the first included
    timeout_s: float = 30.0  # a whole request (headers and body); a stalled store past it is retried
    connect_timeout_s: float = 5.0
    retry_budget_s: float = 180.0  # Lance gives up retrying one request after this long


RETRIES = Retries()


def join(base: str, *parts: str) -> str:
    """`parts` under `base`, one "/" apart; a bare scheme ("s3://") stays as it is."""
    head = base if base.endswith("://") else base.rstrip("/") + "/"
    return head + "/".join(p.strip("/") for p in parts)


def glob(pattern: str) -> list[str]:
    """What matches `pattern`, sorted, as URIs of `pattern`'s scheme."""
    fs, path = _fsspec(pattern)
    return _with_scheme(pattern, fs.glob(path))


def find(uri: str) -> list[str]:
    """Every file under `uri`, sorted, as URIs of its scheme."""
    fs, path = _fsspec(uri)
    return _with_scheme(uri, fs.find(path))


def url_to_fs(uri: str):
    """(fsspec filesystem, path) for `uri`; on S3 with `RETRIES` as s3fs's botocore settings."""
    import fsspec

    options = {}
    if uri.startswith("s3://"):
        options["config_kwargs"] = botocore_config_kwargs()
        # named, not left to botocore's reading of the environment: fsspec reuses a filesystem made
        # with the same arguments, and one made before the endpoint changed would still reach the old
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return fsspec.core.url_to_fs(uri, **options)


def _fsspec(uri: str):
    fs, path = url_to_fs(uri)
    fs.invalidate_cache()  # a listing cached earlier in this process may predate what was written since
    return fs, path


def _with_scheme(like: str, paths: list[str]) -> list[str]:
    # fsspec lists an object store's paths without their scheme
    scheme = like.split("://")[0] + "://" if is_remote(like) else ""
    return sorted(p if p.startswith(scheme) else scheme + p for p in paths)


def storage_options(uri: str) -> dict[str, str]:
    """Lance storage options for `uri`, from the usual AWS environment variables, with `RETRIES`."""
    if not uri.startswith("s3://"):
        return {}
    env = {
        "aws_access_key_id": "AWS_ACCESS_KEY_ID",
        "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "aws_session_token": "AWS_SESSION_TOKEN",
        "aws_region": "AWS_DEFAULT_REGION",
        "aws_endpoint": "AWS_ENDPOINT_URL",
    }
    opts = {k: os.environ[v] for k, v in env.items() if os.environ.get(v)}
    if "aws_region" not in opts and os.environ.get("AWS_REGION"):
        opts["aws_region"] = os.environ["AWS_REGION"]
    if opts.get("aws_endpoint", "").startswith("http://"):
        opts["allow_http"] = "true"
    return {**opts, **lance_retry_options()}


def lance_retry_options(retries: Retries = RETRIES) -> dict[str, str]:
    """`retries` as Lance storage options. Lance's own keys (client_max_retries counts retries after
    the first try; client_retry_timeout in whole seconds) beside object_store's client timeouts.
    object_store retries 5xx, connection errors and timeouts before a reply's body, and a GET's
    body cut short; a LIST reply whose body is cut short ("Error getting list response body") it
    does not retry, whatever these say: the operation fails, and a re-run finishes it."""
    return {
        "client_max_retries": str(retries.attempts - 1),
        "client_retry_timeout": str(int(retries.retry_budget_s)),
        "timeout": f"{retries.timeout_s:g}s",
        "connect_timeout": f"{retries.connect_timeout_s:g}s",
    }


def botocore_config_kwargs(retries: Retries = RETRIES) -> dict:
    """`retries` as botocore.config.Config arguments (boto3 and s3fs's aiobotocore). "standard" mode
    retries 500, 503 SlowDown, throttling and connection errors with backoff; s3fs adds its own few
    retries of read errors and SlowDown on top (its `retries` attribute, 5)."""
    return {"retries": {"mode": "standard", "total_max_attempts": retries.attempts},
            "connect_timeout": retries.connect_timeout_s, "read_timeout": retries.timeout_s}


def botocore_config(retries: Retries = RETRIES):
    from botocore.config import Config

    return Config(**botocore_config_kwargs(retries))


def arrow_filesystem(uri: str, credentials: bool = True):
    """(pyarrow filesystem, path) for `uri`, with the object store's settings spelled out.

    Such a filesystem pickles with its settings, so a Ray actor that never saw this process's AWS
    variables (Ray Train's controller, which resolves a run's storage itself) reaches the same store.
    `credentials=False` leaves the keys out, for a filesystem handed to other processes: they sign
    with their own environment's, and no key travels in a pickle.
    """
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
    if not uri.startswith("s3://"):
        return pafs.FileSystem.from_uri(uri)
    opts = storage_options(uri)
    kwargs = {"region": opts.get("aws_region"), "connect_timeout": RETRIES.connect_timeout_s,
              "request_timeout": RETRIES.timeout_s}
    if credentials and opts.get("aws_access_key_id") and opts.get("aws_secret_access_key"):
        kwargs.update(access_key=opts["aws_access_key_id"], secret_key=opts["aws_secret_access_key"],
                      session_token=opts.get("aws_session_token"))
    if opts.get("aws_endpoint"):
        scheme, _, host = opts["aws_endpoint"].partition("://")
        kwargs.update(scheme=scheme, endpoint_override=host.rstrip("/"))
    return _retrying_s3({k: v for k, v in kwargs.items() if v}), uri[len("s3://"):].rstrip("/")


def _retrying_s3(kwargs: dict):
    """pyarrow's S3FileSystem with `RETRIES.attempts` tries a request, kept through pickling.

    pyarrow (26) leaves the retry strategy out of the filesystem's pickle: Ray Train's controller,
    which gets the run's storage pickled, fell back to 3 tries and died on a store's 503 SlowDown.
    The standard strategy retries what the AWS C++ SDK calls retryable: 5xx, SlowDown, connection
    errors and timeouts.
    """
    import pyarrow.fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        def __reduce__(self):
            return _retrying_s3, (kwargs,)

    return RetryingS3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=RETRIES.attempts),
                                **kwargs)
