"""Read and write datasets and artifacts in a local folder or in S3-compatible object storage.

A location is either a local folder path or a URI ``s3://bucket/prefix``. The S3 connection is
configured from environment variables (see ``S3Settings.from_env``) so that the same code runs
against MinIO inside a Kubeflow cluster, AWS S3, or a test server. Every expected failure is raised
as ``StorageError`` with a message that names the endpoint, bucket, object or variable at fault.
Writes never leave a half-written result visible: objects are uploaded whole, a ``_SUCCESS``
marker is written last, and local destinations are filled in a temporary folder and then renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.util import Retry, Timeout

from dfu_ml.errors import StorageError

SUCCESS_MARKER = "_SUCCESS"

ENDPOINT_VAR = "DFU_S3_ENDPOINT"
ACCESS_KEY_VAR = "DFU_S3_ACCESS_KEY"
SECRET_KEY_VAR = "DFU_S3_SECRET_KEY"
SECURE_VAR = "DFU_S3_SECURE"
REGION_VAR = "DFU_S3_REGION"
ACCESS_KEY_FALLBACK_VAR = "AWS_ACCESS_KEY_ID"
SECRET_KEY_FALLBACK_VAR = "AWS_SECRET_ACCESS_KEY"

# Short connect timeout and few retries: an unreachable endpoint fails in about 15 s instead of
# minio's default of several minutes. The read timeout is longer because large objects are slow.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 30.0
RETRIES = 3
BACKOFF_FACTOR_S = 0.5
RETRY_STATUSES = (500, 502, 503, 504)

_TRUE_WORDS = {"true", "1", "yes"}
_FALSE_WORDS = {"false", "0", "no"}
_CREDENTIAL_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
}
# S3 bucket naming rules; checking them here gives a clearer message than minio's ValueError.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


# --------------------------------------------------------------------------------------------
# Locations


def is_s3_uri(location: str | os.PathLike) -> bool:
    """Return True when ``location`` is an ``s3://`` URI rather than a local path."""
    return isinstance(location, str) and location.lower().startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix")``.

    The prefix has no leading or trailing slash and is empty for a whole bucket. A URI without
    the ``s3://`` scheme, without a bucket or with an invalid bucket name raises StorageError.
    """
    if not is_s3_uri(uri):
        raise StorageError(f"{uri!r} is not an S3 URI; expected the form s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"S3 URI {uri!r} has no bucket; expected the form s3://bucket/prefix")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise StorageError(
            f"S3 URI {uri!r} has an invalid bucket name {bucket!r}; bucket names are 3-63 "
            "lowercase letters, digits, dots or hyphens"
        )
    return bucket, prefix.strip("/")


def _object_key(prefix: str, relative: str) -> str:
    """Join a key prefix and a relative path the way S3 keys are written."""
    return f"{prefix}/{relative}" if prefix else relative


def _s3_uri(bucket: str, key: str) -> str:
    """Format a bucket and key back into a URI for messages."""
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


# --------------------------------------------------------------------------------------------
# Settings and client


@dataclass(frozen=True)
class S3Settings:
    """How to reach the object store: endpoint ``host:port``, keys, TLS flag and optional region.

    The secret key is left out of ``repr()`` so that logging the settings never leaks it.
    """

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    secure: bool = True
    region: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Read the settings from ``DFU_S3_*`` variables (keys fall back to ``AWS_*``).

        Missing values raise a single StorageError naming every missing variable, so a user
        fixes the configuration in one go.
        """
        env = os.environ if environ is None else environ
        raw_endpoint = _env_value(env, ENDPOINT_VAR)
        access_key = _env_value(env, ACCESS_KEY_VAR) or _env_value(env, ACCESS_KEY_FALLBACK_VAR)
        secret_key = _env_value(env, SECRET_KEY_VAR) or _env_value(env, SECRET_KEY_FALLBACK_VAR)

        missing = []
        if not raw_endpoint:
            missing.append(f"{ENDPOINT_VAR} (host:port of the S3/MinIO server)")
        if not access_key:
            missing.append(f"{ACCESS_KEY_VAR} (or {ACCESS_KEY_FALLBACK_VAR})")
        if not secret_key:
            missing.append(f"{SECRET_KEY_VAR} (or {SECRET_KEY_FALLBACK_VAR})")
        if missing:
            raise StorageError(
                "S3 storage is not configured; set "
                + ", ".join(missing)
                + f". Optionally set {SECURE_VAR}=false for a plain-HTTP server and {REGION_VAR}."
            )

        endpoint, scheme_secure = _split_endpoint(raw_endpoint)
        secure = _secure_flag(_env_value(env, SECURE_VAR), scheme_secure)
        return cls(
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=_env_value(env, REGION_VAR) or None,
        )


def _env_value(env: Mapping[str, str], name: str) -> str:
    """Return a variable stripped of blanks; unset and empty read the same."""
    return (env.get(name) or "").strip()


def _split_endpoint(raw: str) -> tuple[str, bool | None]:
    """Strip an ``http://``/``https://`` scheme from the endpoint and say which one it was.

    minio wants a bare ``host:port``; users often paste a URL, so the scheme is accepted and
    turned into the TLS flag. A path after the host is a mistake and is reported.
    """
    scheme_secure = None
    endpoint = raw
    lowered = raw.lower()
    for scheme, secure in (("https://", True), ("http://", False)):
        if lowered.startswith(scheme):
            endpoint, scheme_secure = raw[len(scheme) :], secure
            break
    endpoint = endpoint.rstrip("/")
    unknown_scheme = "://" in raw and scheme_secure is None
    if not endpoint or "/" in endpoint or unknown_scheme:
        raise StorageError(
            f"{ENDPOINT_VAR}={raw!r} is not a valid endpoint; give host:port, "
            "for example minio-service.kubeflow:9000"
        )
    return endpoint, scheme_secure


def _secure_flag(value: str, scheme_secure: bool | None) -> bool:
    """Turn ``DFU_S3_SECURE`` into a bool, defaulting to the endpoint's scheme or to TLS on."""
    if not value:
        return True if scheme_secure is None else scheme_secure
    word = value.lower()
    if word in _TRUE_WORDS:
        secure = True
    elif word in _FALSE_WORDS:
        secure = False
    else:
        raise StorageError(
            f"{SECURE_VAR}={value!r} is not a boolean; use true/false, 1/0 or yes/no"
        )
    if scheme_secure is not None and scheme_secure != secure:
        raise StorageError(
            f"{ENDPOINT_VAR} uses {'https' if scheme_secure else 'http'}:// but {SECURE_VAR}="
            f"{value!r}; make them agree or drop the scheme from {ENDPOINT_VAR}"
        )
    return secure


def make_client(settings: S3Settings) -> Minio:
    """Build a minio client whose HTTP pool retries transient failures a few times, quickly.

    Connect and read errors and HTTP 500/502/503/504 are retried with exponential backoff; the
    last 5xx response is handed back to minio so it becomes a normal S3 error.
    """
    retries = Retry(
        total=RETRIES,
        connect=RETRIES,
        read=RETRIES,
        status=RETRIES,
        backoff_factor=BACKOFF_FACTOR_S,
        status_forcelist=RETRY_STATUSES,
        raise_on_status=False,
    )
    http = urllib3.PoolManager(
        timeout=Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
        retries=retries,
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        # Same CA bundle as minio's own default client, so behaviour matches it.
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )
    try:
        return Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=settings.secure,
            region=settings.region,
            http_client=http,
        )
    except ValueError as exc:
        raise StorageError(
            f"{ENDPOINT_VAR}={settings.endpoint!r} is not usable: {exc}; give host:port"
        ) from exc


def _connect(settings: S3Settings | None) -> tuple[S3Settings, Minio]:
    """Use the given settings, or read them from the environment, and build a client."""
    settings = settings or S3Settings.from_env()
    return settings, make_client(settings)


# --------------------------------------------------------------------------------------------
# Error translation


@contextmanager
def _storage_errors(
    action: str,
    settings: S3Settings | None = None,
    bucket: str | None = None,
    key: str | None = None,
) -> Iterator[None]:
    """Turn minio and urllib3 exceptions raised while doing ``action`` into StorageError."""
    try:
        yield
    except StorageError:
        raise
    except S3Error as exc:
        raise StorageError(_redact(_s3_error_message(exc, action, bucket, key), settings)) from exc
    except (ServerError, InvalidResponseError) as exc:
        raise StorageError(
            _redact(
                f"{action} failed: the S3 server at {_endpoint_name(settings)} "
                f"answered with an error: {exc}",
                settings,
            )
        ) from exc
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise StorageError(
            _redact(
                f"{action} failed: cannot reach the S3 endpoint {_endpoint_name(settings)} "
                f"({reason}). Check {ENDPOINT_VAR} and {SECURE_VAR} "
                "and that the server is running and reachable from here.",
                settings,
            )
        ) from exc


def _s3_error_message(exc: S3Error, action: str, bucket: str | None, key: str | None) -> str:
    """Explain an S3 error code in terms of what the user should fix."""
    bucket = exc.bucket_name or bucket
    if exc.code in _CREDENTIAL_CODES:
        return (
            f"{action} failed: the S3 server refused the credentials ({exc.code}). Check "
            f"{ACCESS_KEY_VAR} and {SECRET_KEY_VAR} (or {ACCESS_KEY_FALLBACK_VAR} and "
            f"{SECRET_KEY_FALLBACK_VAR}) and that this user may access bucket {bucket!r}."
        )
    if exc.code == "NoSuchBucket":
        return f"{action} failed: bucket {bucket!r} does not exist. Create it or fix the s3:// URI."
    if exc.code in ("NoSuchKey", "NoSuchObject"):
        missing = _s3_uri(bucket, exc.object_name or key or "") if bucket else exc.object_name
        return f"{action} failed: object {missing} does not exist."
    return f"{action} failed: S3 error {exc.code}: {exc.message}"


def _endpoint_name(settings: S3Settings | None) -> str:
    """Name the endpoint in a message, or the variable that sets it when it is unknown."""
    if settings is None:
        return f"(set by {ENDPOINT_VAR})"
    scheme = "https" if settings.secure else "http"
    return f"{scheme}://{settings.endpoint}"


def _redact(message: str, settings: S3Settings | None) -> str:
    """Remove the secret key from a message in case a server or library echoed it."""
    # Real secrets are long (MinIO needs 8+ characters); replacing a tiny test secret like "b"
    # would garble the message without protecting anything.
    if settings is not None and len(settings.secret_key) >= 8:
        return message.replace(settings.secret_key, "***")
    return message


# --------------------------------------------------------------------------------------------
# Local filesystem helpers


def _require_local_dir(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path, or raise StorageError when it is not an existing folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise StorageError(f"local folder {str(folder)!r} does not exist or is not a folder")
    return folder


def _require_local_file(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path, or raise StorageError when it is not an existing file."""
    file = Path(path)
    if not file.is_file():
        raise StorageError(f"local file {str(file)!r} does not exist or is not a file")
    return file


def _files_under(folder: Path) -> list[tuple[str, Path]]:
    """List ``(relative posix path, file)`` for every file below ``folder``, sorted."""
    return sorted(
        (path.relative_to(folder).as_posix(), path) for path in folder.rglob("*") if path.is_file()
    )


def _safe_relative(relative: str, uri: str) -> PurePosixPath:
    """Reject object keys that would escape the destination folder (``..`` or absolute)."""
    path = PurePosixPath(relative)
    if not relative or path.is_absolute() or ".." in path.parts:
        raise StorageError(f"object {uri} has a key that cannot be saved as a local file")
    return path


@contextmanager
def _atomic_local_dir(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``destination`` and publish it there on success.

    Readers never see a half-copied tree: a new or empty destination is replaced by one rename.
    Into an existing non-empty folder each file is moved with ``os.replace``, which is atomic per
    file. On failure the temporary folder is removed and the destination is left untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield staging
        _publish_dir(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_dir(staging: Path, destination: Path) -> None:
    """Move the staged tree into place (see ``_atomic_local_dir``)."""
    if destination.is_dir() and not any(destination.iterdir()):
        destination.rmdir()
    if not destination.exists():
        os.replace(staging, destination)
        return
    for relative, file in _files_under(staging):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)


@contextmanager
def _atomic_local_file(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination`` and rename it into place on success."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield staging
        os.replace(staging, destination)
    finally:
        staging.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Buckets and single objects


def ensure_bucket(client: Minio, bucket: str) -> None:
    """Create ``bucket`` unless it already exists."""
    with _storage_errors(f"creating bucket {bucket!r}", bucket=bucket):
        if client.bucket_exists(bucket):
            return
        try:
            client.make_bucket(bucket)
        except S3Error as exc:
            # Another process may have created it between the check and the create.
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


def upload_file(
    local_path: str | os.PathLike, uri: str, *, settings: S3Settings | None = None
) -> None:
    """Upload one local file to the object ``uri`` (or copy it atomically to a local path)."""
    source = _require_local_file(local_path)
    if not is_s3_uri(uri):
        with _atomic_local_file(uri) as staging:
            shutil.copyfile(source, staging)
        return
    bucket, key = parse_s3_uri(uri)
    if not key:
        raise StorageError(f"S3 URI {uri!r} names a bucket but no object key")
    settings, client = _connect(settings)
    with _storage_errors(f"uploading {source} to {uri}", settings, bucket, key):
        client.fput_object(bucket, key, str(source))


def download_file(
    uri: str, local_path: str | os.PathLike, *, settings: S3Settings | None = None
) -> Path:
    """Download the object ``uri`` (or copy a local file) to ``local_path`` and return it."""
    if not is_s3_uri(uri):
        source = _require_local_file(uri)
        with _atomic_local_file(local_path) as staging:
            shutil.copyfile(source, staging)
        return Path(local_path)
    bucket, key = parse_s3_uri(uri)
    if not key:
        raise StorageError(f"S3 URI {uri!r} names a bucket but no object key")
    settings, client = _connect(settings)
    with _storage_errors(f"downloading {uri}", settings, bucket, key):
        _download_object(client, bucket, key, Path(local_path))
    return Path(local_path)


def _download_object(client: Minio, bucket: str, key: str, destination: Path) -> None:
    """Stream one object into a temporary file and rename it into place when complete."""
    with _atomic_local_file(destination) as staging:
        response = client.get_object(bucket, key)
        try:
            with open(staging, "wb") as out:
                for chunk in response.stream(1024 * 1024):
                    out.write(chunk)
        finally:
            response.close()
            response.release_conn()


# --------------------------------------------------------------------------------------------
# Trees


def upload_tree(
    local_dir: str | os.PathLike, uri: str, *, settings: S3Settings | None = None
) -> None:
    """Upload every file under ``local_dir`` below the prefix ``uri``, then a ``_SUCCESS`` marker.

    Each file is uploaded whole with ``fput_object`` (S3 shows an object only once complete).
    Any old marker is removed first and the new one, listing every file and its size, is written
    last, so a reader that finds the marker knows the whole tree is there. A local ``uri`` is
    handled by ``copy_tree``.
    """
    source = _require_local_dir(local_dir)
    if not is_s3_uri(uri):
        copy_tree(source, uri)
        return
    # A root-level _SUCCESS file would clash with the marker written below; that one replaces it.
    files = [(rel, path) for rel, path in _files_under(source) if rel != SUCCESS_MARKER]
    if not files:
        raise StorageError(f"local folder {str(source)!r} holds no files to upload to {uri}")
    bucket, prefix = parse_s3_uri(uri)
    settings, client = _connect(settings)
    marker_key = _object_key(prefix, SUCCESS_MARKER)
    with _storage_errors(f"uploading {source} to {uri}", settings, bucket):
        client.remove_object(bucket, marker_key)
        for relative, path in files:
            client.fput_object(bucket, _object_key(prefix, relative), str(path))
        _put_marker(client, bucket, marker_key, files)


def _put_marker(client: Minio, bucket: str, marker_key: str, files: list[tuple[str, Path]]) -> None:
    """Write the ``_SUCCESS`` object: JSON with every uploaded file's relative path and size."""
    marker = {"files": {relative: path.stat().st_size for relative, path in files}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as out:
        json.dump(marker, out, indent=1, sort_keys=True)
    try:
        client.fput_object(bucket, marker_key, out.name, content_type="application/json")
    finally:
        os.unlink(out.name)


def tree_is_complete(uri_or_path: str | os.PathLike, *, settings: S3Settings | None = None) -> bool:
    """True when a complete tree is at ``uri_or_path``: an S3 prefix with its ``_SUCCESS``
    marker, or a local folder (local trees are published by one rename, so any is complete)."""
    if not is_s3_uri(uri_or_path):
        folder = Path(uri_or_path)
        return folder.is_dir() and any(folder.iterdir())
    bucket, prefix = parse_s3_uri(str(uri_or_path))
    settings, client = _connect(settings)
    marker_key = _object_key(prefix, SUCCESS_MARKER)
    with _storage_errors(f"checking {uri_or_path}", settings, bucket, marker_key):
        try:
            client.stat_object(bucket, marker_key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket"):
                return False
            raise
    return True


def download_tree(
    uri_or_path: str | os.PathLike,
    local_dir: str | os.PathLike,
    *,
    settings: S3Settings | None = None,
) -> Path:
    """Return a local folder holding the tree at ``uri_or_path``.

    A local folder is returned as it is. For an ``s3://`` prefix every object below it is
    downloaded into ``local_dir`` keeping relative paths (the folder appears only once complete);
    when a ``_SUCCESS`` marker exists every file it lists must arrive with the listed size.
    """
    if not is_s3_uri(uri_or_path):
        return _require_local_dir(uri_or_path)
    uri = str(uri_or_path)
    bucket, prefix = parse_s3_uri(uri)
    settings, client = _connect(settings)
    with _storage_errors(f"downloading {uri}", settings, bucket):
        relatives = _list_relative_keys(client, bucket, prefix)
        if not relatives:
            raise StorageError(f"no objects under {_s3_uri(bucket, prefix)}; check the URI")
        with _atomic_local_dir(local_dir) as staging:
            for relative in relatives:
                key = _object_key(prefix, relative)
                target = staging / _safe_relative(relative, _s3_uri(bucket, key))
                _download_object(client, bucket, key, target)
            marker = staging / SUCCESS_MARKER
            if marker.is_file():
                _check_against_marker(staging, marker, _s3_uri(bucket, prefix))
                marker.unlink()
    return Path(local_dir)


def _list_relative_keys(client: Minio, bucket: str, prefix: str) -> list[str]:
    """List object keys below ``prefix`` relative to it, skipping folder placeholder objects."""
    # The trailing slash keeps s3://b/data from also matching s3://b/data2/...
    list_prefix = f"{prefix}/" if prefix else None
    relatives = []
    for obj in client.list_objects(bucket, prefix=list_prefix, recursive=True):
        name = obj.object_name or ""
        if name.endswith("/"):
            continue
        relatives.append(name[len(list_prefix or "") :])
    return relatives


def _check_against_marker(folder: Path, marker: Path, uri: str) -> None:
    """Raise StorageError unless every file the marker lists is in ``folder`` with its size."""
    try:
        listed = json.loads(marker.read_text())["files"]
        expected = {str(relative): int(size) for relative, size in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"the {SUCCESS_MARKER} marker under {uri} is malformed: {exc}") from exc
    for relative, size in sorted(expected.items()):
        path = folder / relative
        if not path.is_file():
            raise StorageError(
                f"incomplete tree under {uri}: {relative} is listed in {SUCCESS_MARKER} but "
                "missing; upload the tree again"
            )
        actual = path.stat().st_size
        if actual != size:
            raise StorageError(
                f"incomplete tree under {uri}: {relative} has {actual} bytes but "
                f"{SUCCESS_MARKER} lists {size}; upload the tree again"
            )


def copy_tree(
    src: str | os.PathLike, dst: str | os.PathLike, *, settings: S3Settings | None = None
) -> None:
    """Copy a tree between any two locations, local or ``s3://``.

    Local destinations are written into a temporary folder beside ``dst`` and then moved into
    place; S3 destinations get a ``_SUCCESS`` marker (see ``upload_tree``). S3 to S3 passes
    through a local temporary folder so the source's marker is checked on the way.
    """
    if is_s3_uri(dst):
        if is_s3_uri(src):
            with tempfile.TemporaryDirectory() as scratch:
                local = download_tree(src, Path(scratch) / "tree", settings=settings)
                upload_tree(local, str(dst), settings=settings)
        else:
            upload_tree(src, str(dst), settings=settings)
        return
    if is_s3_uri(src):
        download_tree(src, dst, settings=settings)
        return
    source = _require_local_dir(src)
    with _atomic_local_dir(dst) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
