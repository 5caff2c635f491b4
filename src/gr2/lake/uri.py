"""URIs: a lake, a source or a checkpoint is a local path or an object-store URI (s3://bucket/prefix).

The one place that tells the two apart, joins them, lists them and opens a filesystem on them.
"""

from __future__ import annotations

import os


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


def _fsspec(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()  # a listing cached earlier in this process may predate what was written since
    return fs, path


def _with_scheme(like: str, paths: list[str]) -> list[str]:
    # fsspec lists an object store's paths without their scheme
    scheme = like.split("://")[0] + "://" if is_remote(like) else ""
    return sorted(p if p.startswith(scheme) else scheme + p for p in paths)


def storage_options(uri: str) -> dict[str, str]:
    """Lance storage options for `uri`, from the usual AWS environment variables."""
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
    return opts


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
    kwargs = {"region": opts.get("aws_region")}
    if credentials and opts.get("aws_access_key_id") and opts.get("aws_secret_access_key"):
        kwargs.update(access_key=opts["aws_access_key_id"], secret_key=opts["aws_secret_access_key"],
                      session_token=opts.get("aws_session_token"))
    if opts.get("aws_endpoint"):
        scheme, _, host = opts["aws_endpoint"].partition("://")
        kwargs.update(scheme=scheme, endpoint_override=host.rstrip("/"))
    return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v}), uri[len("s3://"):].rstrip("/")
