"""Object stores through pyarrow's filesystems: one resolution, one reachability check, one-line errors.

Any URI pyarrow resolves (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``) works for data and for
checkpoints alike. An S3-compatible store (MinIO, Ceph, moto) is reached the standard way:
``AWS_ENDPOINT_URL`` and the usual ``AWS_*`` variables, which pyarrow reads when it resolves the URI.
The resolved filesystem, endpoint included, is what Ray tasks receive, so workers need no endpoint
setting of their own; keys set in the driver's environment travel with it too, otherwise each node
uses its own chain (profile, instance role), as any AWS client does.

No Ray and no MLflow here: the driver checks a location before any worker starts.
"""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs


class ObjectStoreError(ValueError):
    """An object store that cannot be used: unreachable, refusing the credentials, or a bad URI."""


_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Could not resolve", "Connection refused", "curlCode")
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "HTTP status 403",
           "EXPIRED_TOKEN", "MISSING_AUTHENTICATION", "No credentials", "UNRECOGNIZED_CLIENT")
_NO_BUCKET = ("NO_SUCH_BUCKET", "Bucket '")


def is_uri(path: str | os.PathLike[str]) -> bool:
    """``scheme://...`` other than ``file://``: a location that is not a local path."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _endpoint() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"the endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "the provider's default endpoint"


def explain(uri: str, exc: BaseException) -> ObjectStoreError:
    """One line a user can act on, from pyarrow's (long, multi-part) error text."""
    text = " ".join(str(exc).split())
    if any(marker in text for marker in _UNREACHABLE):
        return ObjectStoreError(
            f"{uri}: cannot reach the object store at {_endpoint()}; check AWS_ENDPOINT_URL "
            "(for MinIO, Ceph or moto: http://host:port) and that the server is up"
        )
    if any(marker in text for marker in _DENIED):
        return ObjectStoreError(
            f"{uri}: {_endpoint()} refused the credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or give the nodes an instance role) to credentials that may read it "
            "(and write it, for checkpoint storage)"
        )
    if any(marker in text for marker in _NO_BUCKET):
        return ObjectStoreError(f"{uri}: the bucket does not exist at {_endpoint()}; create it or fix the URI")
    return ObjectStoreError(f"{uri}: {text[:300]}")


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it (``bucket/prefix`` for S3)."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        raise ObjectStoreError(
            f"{uri}: not a location pyarrow can open ({' '.join(str(exc).split())[:200]}); use a local "
            "directory or a URI such as s3://bucket/prefix or gs://bucket/prefix"
        ) from None
    return _with_driver_credentials(fs), path.rstrip("/")


def _with_driver_credentials(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 filesystem carrying the driver's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and session
    token) when they are set: Ray's processes (started before, or on other nodes) may not have them.
    Without them in the environment, each node keeps its own chain (profile, instance role)."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not isinstance(fs, pafs.S3FileSystem) or not key or not secret:
        return fs
    options = fs.__reduce__()[1][0]  # the options pyarrow resolved from the URI and the environment
    return pafs.S3FileSystem(
        access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"),
        region=fs.region, scheme=options["scheme"], endpoint_override=options["endpoint_override"] or None,
        force_virtual_addressing=options["force_virtual_addressing"],
    )


def file_info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    """``fs.get_file_info(path)`` with the store's failures as ObjectStoreError."""
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise explain(uri, exc) from None


def list_entries(fs: pafs.FileSystem, path: str, uri: str, recursive: bool) -> list[pafs.FileInfo]:
    """Entries under ``path`` (sorted by path); [] when there is no such directory."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as exc:
        raise explain(uri, exc) from None
    return sorted(infos, key=lambda info: info.path)


def check_writable(uri: str) -> None:
    """Write and delete one small object under ``uri``: a wrong endpoint, missing credentials or a
    read-only key fail here, on the driver, instead of at the first checkpoint."""
    fs, path = filesystem_of(uri)
    probe = f"{path}/.raydino-write-check-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"raydino")
        fs.delete_file(probe)
    except OSError as exc:
        raise explain(uri, exc) from None
