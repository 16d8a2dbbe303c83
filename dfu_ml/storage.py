"""Read and write datasets and artifacts in a local folder or in S3-compatible object storage.

A location is either a local folder path or a URI ``s3://bucket/prefix``. The S3 connection is
configured from environment variables (see ``S3Settings.from_env``) so that the same code runs
against MinIO inside a Kubeflow cluster, AWS S3, or a test server. Every expected failure is raised
as ``StorageError`` with a message that names the endpoint, bucket, object or variable at fault.

Complete or invisible: a tree written to S3 becomes visible only when its ``_SUCCESS`` marker,
which lists every file with its size and SHA-256, is written last, and overwriting a tree never
exposes a mixture of old and new objects (see "Trees" below); readers check every file against the
marker. Local destinations are filled in a temporary folder and then renamed into place.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.util import Retry, Timeout

from dfu_ml.errors import StorageError

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


# Fields of a signed request that a library may echo in an error: the value goes, the name stays.
_SIGNED_FIELDS = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|Credential|"
    r"Authorization)(\s*[=:]\s*)([^\s&,;\"'<>]+)"
)
# A secret at least this long is removed wherever it appears; a shorter one only where it stands
# as a whole token, so that a secret "b" does not turn "bucket" into "***ucket".
_LONG_SECRET = 8
_TOKEN_CHARS = "A-Za-z0-9"


def _redact(message: str, settings: S3Settings | None) -> str:
    """Remove the secret key, and any signature or credential field, from a message in case a
    server or library echoed them."""
    message = _SIGNED_FIELDS.sub(lambda m: f"{m.group(1)}{m.group(2)}***", message)
    secret = settings.secret_key if settings is not None else ""
    if not secret:
        return message
    if len(secret) >= _LONG_SECRET:
        return message.replace(secret, "***")
    token = rf"(?<![{_TOKEN_CHARS}]){re.escape(secret)}(?![{_TOKEN_CHARS}])"
    return re.sub(token, "***", message)


def _warn(message: str) -> None:
    """A warning on stderr, where the step CLIs and the KFP log show it."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Digests

_CHUNK = 1024 * 1024
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileEntry:
    """A file's size in bytes and SHA-256 (hex): what a tree marker or a bundle manifest lists."""

    size: int
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileEntry:
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
                size += len(chunk)
        return cls(size, digest.hexdigest())

    @classmethod
    def from_dict(cls, value: Mapping) -> FileEntry:
        """Parse ``{"size": n, "sha256": hex}``; ValueError/TypeError/KeyError when malformed."""
        size, sha256 = value["size"], value["sha256"]
        if type(size) is not int or size < 0 or not _SHA256_HEX.fullmatch(str(sha256)):
            raise ValueError(f"not a size and SHA-256: {dict(value)!r}")
        return cls(size, str(sha256))

    def describe(self) -> str:
        return f"{self.size} bytes, SHA-256 {self.sha256[:12]}..."


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
def _local_staging_dir(destination: Path) -> Iterator[Path]:
    """Yield a new temporary folder beside ``destination``, removed on exit: a failure leaves
    nothing behind, and what was published had been renamed out of it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _empty_dir(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _publish_dir(staging: Path, destination: Path, if_absent: bool = False) -> bool:
    """Move a staged tree to ``destination``; False when ``if_absent`` found a tree there.

    A new (or empty) destination appears by one rename, whole. Into an existing non-empty folder
    each file is moved with ``os.replace`` (atomic per file), unless ``if_absent``: then the folder
    is left as it is, since another writer published it first.
    """
    try:
        os.rename(staging, destination)  # replaces an empty folder, refuses a non-empty one
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not destination.is_dir():
            raise
    if if_absent:
        return False
    for relative, file in _files_under(staging):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    return True


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


def _download_object(client: Minio, bucket: str, key: str, destination: Path) -> FileEntry:
    """Stream one object into a temporary file, rename it into place when complete, and return
    what arrived (size and SHA-256)."""
    digest, size = hashlib.sha256(), 0
    with _atomic_local_file(destination) as staging:
        response = client.get_object(bucket, key)
        try:
            with open(staging, "wb") as out:
                for chunk in response.stream(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        finally:
            response.close()
            response.release_conn()
    return FileEntry(size, digest.hexdigest())


def _list_sizes(client: Minio, bucket: str, prefix: str) -> dict[str, int]:
    """Every object below ``prefix``: relative key -> size, skipping folder placeholders."""
    # The trailing slash keeps s3://b/data from also matching s3://b/data2/...
    list_prefix = f"{prefix}/" if prefix else None
    sizes = {}
    for obj in client.list_objects(bucket, prefix=list_prefix, recursive=True):
        name = obj.object_name or ""
        if not name.endswith("/"):
            sizes[name[len(list_prefix or "") :]] = obj.size
    return sizes


def _is_missing(exc: S3Error) -> bool:
    return exc.code in ("NoSuchKey", "NoSuchObject")


# --------------------------------------------------------------------------------------------
# Trees: complete or invisible
#
# upload_tree never writes where a reader looks before the whole tree is there. Every file goes
# to a new version folder, PREFIX/_versions/<version>/<relative path>; then one small object,
# PREFIX/_SUCCESS (the marker), is written last: it names the version and lists every file with
# its size and SHA-256. S3 shows a PUT object whole or not at all, so a reader sees the previous
# marker (the previous tree, whose objects are still there) or the new one (the new tree, all
# uploaded), never a mixture. Earlier versions are removed after the switch; a reader that was
# still downloading one starts again from the new marker.


SUCCESS_MARKER = "_SUCCESS"
VERSIONS_FOLDER = "_versions"
MARKER_FORMAT = "dfu-kfp-tree/2"
# How often a download starts again because the tree was replaced while it ran.
REPLACED_RETRIES = 3
_VERSION_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z.-]*")


@dataclass(frozen=True)
class TreeMarker:
    """The ``_SUCCESS`` object of a tree written by ``upload_tree``: the version folder that
    holds the tree, and every file's size and SHA-256."""

    version: str
    files: dict[str, FileEntry]

    def to_json(self) -> bytes:
        files = {rel: dataclasses.asdict(entry) for rel, entry in sorted(self.files.items())}
        data = {"format": MARKER_FORMAT, "version": self.version, "files": files}
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> TreeMarker:
        """Parse a marker; StorageError naming ``uri`` when it is malformed or of another format."""
        try:
            value = json.loads(data)
            fmt = value.get("format")
            if fmt == MARKER_FORMAT:
                version, files = value["version"], value["files"]
                if not _VERSION_NAME.fullmatch(version):
                    raise ValueError(f"version {version!r}")
                entries = {str(rel): FileEntry.from_dict(entry) for rel, entry in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(
                f"the {SUCCESS_MARKER} marker under {uri} is malformed ({exc!r}); upload the "
                "tree again"
            ) from exc
        if fmt != MARKER_FORMAT:
            raise StorageError(
                f"the {SUCCESS_MARKER} marker under {uri} has format {fmt!r}, not "
                f"{MARKER_FORMAT!r} (written by an older dfu-kfp, without checksums); upload the "
                "tree again"
            )
        return cls(version, entries)


def _version_prefix(prefix: str, version: str) -> str:
    return _object_key(prefix, f"{VERSIONS_FOLDER}/{version}")


def _new_version() -> str:
    """A version name that sorts by creation time (older uploads sort first)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"


def _read_marker(client: Minio, bucket: str, prefix: str) -> TreeMarker | None:
    """The tree's marker, or None when there is none."""
    key = _object_key(prefix, SUCCESS_MARKER)
    try:
        response = client.get_object(bucket, key)
    except S3Error as exc:
        if _is_missing(exc):
            return None
        raise
    try:
        data = response.read()
    finally:
        response.close()
        response.release_conn()
    return TreeMarker.from_json(data, _s3_uri(bucket, prefix))


def _complete_marker(client: Minio, bucket: str, prefix: str) -> TreeMarker | None:
    """The marker when it is well-formed and every object it lists is there with its size."""
    try:
        marker = _read_marker(client, bucket, prefix)
    except StorageError:
        return None
    if marker is None:
        return None
    present = _list_sizes(client, bucket, _version_prefix(prefix, marker.version))
    if any(present.get(rel) != entry.size for rel, entry in marker.files.items()):
        return None
    return marker


def upload_tree(
    local_dir: str | os.PathLike,
    uri: str,
    *,
    settings: S3Settings | None = None,
    if_absent: bool = False,
) -> bool:
    """Upload every file under ``local_dir`` to the prefix ``uri``, complete or invisible.

    See the section comment: files go to a new version folder and the ``_SUCCESS`` marker,
    listing each file's size and SHA-256, is written last. With ``if_absent`` nothing is
    switched when a complete tree is already there (returns False; published models are never
    rewritten). A local ``uri`` is handled by ``copy_tree``. Returns True when written.
    """
    source = _require_local_dir(local_dir)
    if not is_s3_uri(uri):
        return copy_tree(source, uri, if_absent=if_absent)
    files = _files_under(source)
    if not files:
        raise StorageError(f"local folder {str(source)!r} holds no files to upload to {uri}")
    bucket, prefix = parse_s3_uri(uri)
    settings, client = _connect(settings)
    marker = TreeMarker(_new_version(), {rel: FileEntry.of(path) for rel, path in files})
    version_prefix = _version_prefix(prefix, marker.version)
    with _storage_errors(f"uploading {source} to {uri}", settings, bucket):
        for relative, path in files:
            client.fput_object(bucket, _object_key(version_prefix, relative), str(path))
        if if_absent and _complete_marker(client, bucket, prefix) is not None:
            _remove_version(client, bucket, prefix, marker.version)
            return False
        _check_uploaded(client, bucket, prefix, marker)
        data = marker.to_json()
        marker_key = _object_key(prefix, SUCCESS_MARKER)
        client.put_object(
            bucket, marker_key, io.BytesIO(data), len(data), content_type="application/json"
        )
    _remove_older_versions(client, settings, bucket, prefix, marker.version)
    return True


def _check_uploaded(client: Minio, bucket: str, prefix: str, marker: TreeMarker) -> None:
    """Before switching, make sure every uploaded object is still there: the clean-up of a
    concurrent upload to the same prefix may have removed this one's version folder."""
    present = _list_sizes(client, bucket, _version_prefix(prefix, marker.version))
    for relative, entry in sorted(marker.files.items()):
        if present.get(relative) != entry.size:
            raise StorageError(
                f"uploading to {_s3_uri(bucket, prefix)} was disturbed: {relative} is no longer "
                "there after its upload (another upload to the same prefix ran at the same "
                "time?); upload again"
            )


def _remove_version(client: Minio, bucket: str, prefix: str, version: str) -> None:
    version_prefix = _version_prefix(prefix, version)
    keys = [_object_key(version_prefix, rel) for rel in _list_sizes(client, bucket, version_prefix)]
    for error in client.remove_objects(bucket, (DeleteObject(key) for key in keys)):
        name = _s3_uri(bucket, error.name or version_prefix)
        raise StorageError(f"cannot remove {name}: {error.code} {error.message or ''}".strip())


def _list_versions(client: Minio, bucket: str, prefix: str) -> list[str]:
    folder = _object_key(prefix, VERSIONS_FOLDER) + "/"
    names = (obj.object_name or "" for obj in client.list_objects(bucket, prefix=folder))
    return sorted(name[len(folder) :].rstrip("/") for name in names if name.endswith("/"))


def _remove_older_versions(
    client: Minio, settings: S3Settings, bucket: str, prefix: str, current: str
) -> None:
    """Remove the version folders of earlier and of interrupted uploads (best effort: the new
    tree is already in place; a failure only leaves unused objects, and says so). Versions newer
    than ``current`` belong to an upload still running and are left alone."""
    tree = _s3_uri(bucket, prefix)
    try:
        with _storage_errors(f"removing earlier versions of {tree}", settings, bucket):
            for version in _list_versions(client, bucket, prefix):
                if version < current:
                    _remove_version(client, bucket, prefix, version)
    except StorageError as exc:
        _warn(f"{tree} was written, but its earlier versions are left over: {exc}")


def tree_is_complete(uri_or_path: str | os.PathLike, *, settings: S3Settings | None = None) -> bool:
    """True when a complete tree is at ``uri_or_path``: an S3 prefix whose ``_SUCCESS`` marker is
    valid and whose every listed object is there with its size, or a non-empty local folder
    (local trees are published by one rename, so any is complete)."""
    if not is_s3_uri(uri_or_path):
        folder = Path(uri_or_path)
        return folder.is_dir() and any(folder.iterdir())
    bucket, prefix = parse_s3_uri(str(uri_or_path))
    settings, client = _connect(settings)
    with _storage_errors(f"checking {uri_or_path}", settings, bucket):
        try:
            return _complete_marker(client, bucket, prefix) is not None
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                return False
            raise


def download_tree(
    uri_or_path: str | os.PathLike,
    local_dir: str | os.PathLike,
    *,
    settings: S3Settings | None = None,
    allow_unmarked: bool = False,
) -> Path:
    """Return a local folder holding the tree at ``uri_or_path``.

    A local folder is returned as it is. An ``s3://`` prefix is downloaded into ``local_dir``
    (which appears only once complete): the files its ``_SUCCESS`` marker lists, each checked
    against its size and SHA-256. A prefix without a marker is refused, unless
    ``allow_unmarked`` (trees that other tools write: datasets copied with ``aws s3 cp``, KFP's
    own artifacts); then every object is read, with a warning that nothing shows the tree is
    complete. Objects of an unfinished dfu-kfp upload are always refused.
    """
    if not is_s3_uri(uri_or_path):
        return _require_local_dir(uri_or_path)
    destination = Path(local_dir)
    with _local_staging_dir(destination) as staging:
        _fill_from_s3(str(uri_or_path), staging, settings, allow_unmarked)
        _publish_dir(staging, destination)
    return destination


class _TreeReplaced(Exception):
    """A listed object vanished because a newer upload replaced the tree meanwhile."""


def _fill_from_s3(
    uri: str, staging: Path, settings: S3Settings | None, allow_unmarked: bool
) -> None:
    bucket, prefix = parse_s3_uri(uri)
    settings, client = _connect(settings)
    with _storage_errors(f"downloading {uri}", settings, bucket):
        for _ in range(REPLACED_RETRIES):
            marker = _read_marker(client, bucket, prefix)
            if marker is None:
                _fill_unmarked(client, bucket, prefix, staging, allow_unmarked)
                return
            try:
                _fill_marked(client, bucket, prefix, marker, staging)
                return
            except _TreeReplaced:
                _empty_dir(staging)
    raise StorageError(
        f"{_s3_uri(bucket, prefix)} was replaced {REPLACED_RETRIES} times while it was being "
        "downloaded; try again once the uploads to it have finished"
    )


def _fill_marked(
    client: Minio, bucket: str, prefix: str, marker: TreeMarker, staging: Path
) -> None:
    """Download the files a marker lists into ``staging``, checking each one's size and digest."""
    tree = _s3_uri(bucket, prefix)
    version_prefix = _version_prefix(prefix, marker.version)
    for relative, expected in sorted(marker.files.items()):
        key = _object_key(version_prefix, relative)
        target = staging / _safe_relative(relative, _s3_uri(bucket, key))
        try:
            arrived = _download_object(client, bucket, key, target)
        except S3Error as exc:
            if not _is_missing(exc):
                raise
            if _read_marker(client, bucket, prefix) != marker:
                raise _TreeReplaced() from exc
            raise StorageError(
                f"incomplete tree under {tree}: {relative} is listed in {SUCCESS_MARKER} but "
                f"its object {_s3_uri(bucket, key)} is missing; upload the tree again"
            ) from exc
        if arrived != expected:
            raise StorageError(
                f"damaged tree under {tree}: {relative} arrived with {arrived.describe()} but "
                f"{SUCCESS_MARKER} lists {expected.describe()}; upload the tree again"
            )


def _fill_unmarked(
    client: Minio, bucket: str, prefix: str, staging: Path, allow_unmarked: bool
) -> None:
    """Download a tree that has no marker, where that is allowed (see ``download_tree``)."""
    tree = _s3_uri(bucket, prefix)
    sizes = _list_sizes(client, bucket, prefix)
    if not sizes:
        raise StorageError(f"no objects under {tree}; check the URI")
    if any(relative.split("/")[0] == VERSIONS_FOLDER for relative in sizes):
        raise StorageError(
            f"{tree} holds an unfinished upload: objects under {VERSIONS_FOLDER}/ but no "
            f"{SUCCESS_MARKER} marker (the upload was interrupted, or is still running). Upload "
            f"it again (dfu-kfp upload DIR {tree}) or wait for it to finish"
        )
    if not allow_unmarked:
        raise StorageError(
            f"{tree} has no {SUCCESS_MARKER} marker, so nothing shows that it is complete; "
            f"write it with dfu-kfp (dfu-kfp upload DIR {tree})"
        )
    _warn(
        f"{tree} has no {SUCCESS_MARKER} marker (it was not written by dfu-kfp: copied with "
        "another tool, or a KFP artifact), so nothing shows that it is complete; reading its "
        f"{len(sizes)} object{'s' * (len(sizes) != 1)} as they are. Upload datasets with "
        f"`dfu-kfp upload DIR {tree}` to have them verified."
    )
    for relative in sorted(sizes):
        key = _object_key(prefix, relative)
        _download_object(
            client, bucket, key, staging / _safe_relative(relative, _s3_uri(bucket, key))
        )


def copy_tree(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    settings: S3Settings | None = None,
    if_absent: bool = False,
) -> bool:
    """Copy a tree between any two locations, local or ``s3://``; True when written.

    S3 destinations are written by ``upload_tree``. Local destinations are filled in a temporary
    folder beside ``dst`` and then moved into place (one rename when ``dst`` is new). S3 to S3
    passes through a local temporary folder so that the source is verified on the way. With
    ``if_absent`` an existing complete destination is left as it is (returns False).
    """
    if is_s3_uri(dst):
        if is_s3_uri(src):
            with tempfile.TemporaryDirectory() as scratch:
                local = download_tree(src, Path(scratch) / "tree", settings=settings)
                return upload_tree(local, str(dst), settings=settings, if_absent=if_absent)
        return upload_tree(src, str(dst), settings=settings, if_absent=if_absent)
    destination = Path(dst)
    source = None if is_s3_uri(src) else _require_local_dir(src)
    with _local_staging_dir(destination) as staging:
        if source is None:
            _fill_from_s3(str(src), staging, settings, allow_unmarked=False)
        else:
            shutil.copytree(source, staging, dirs_exist_ok=True)
        return _publish_dir(staging, destination, if_absent)
