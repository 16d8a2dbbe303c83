"""Tests for dfu_ml.storage against a real S3 protocol server (moto) and local folders."""

import hashlib
import http.server
import io
import json
import socket
import threading
from pathlib import Path

import pytest

from dfu_ml import storage
from dfu_ml.errors import StorageError
from dfu_ml.storage import (
    S3Settings,
    copy_tree,
    download_file,
    download_tree,
    ensure_bucket,
    is_s3_uri,
    make_client,
    parse_s3_uri,
    tree_is_complete,
    upload_file,
    upload_tree,
)

SECRET = "sup3r-s3cret-value"

TREE = {
    "labels.csv": b"id,label\n1,I\n2,P\n",
    "images/a/001.png": b"\x89PNG" + bytes(range(256)) * 40,
    "images/b/002.png": b"\x89PNG" + b"\x00" * 3000,
    "deep/er/still/notes.txt": b"hello",
}


def make_tree(root: Path, files=TREE) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def client(s3_env):
    client = make_client(S3Settings.from_env())
    ensure_bucket(client, "data")
    return client


# ---------------------------------------------------------------- URIs


def test_is_s3_uri_tells_uris_from_paths():
    assert is_s3_uri("s3://bucket/x")
    assert not is_s3_uri("/data/s3://x")
    assert not is_s3_uri("relative/folder")
    assert not is_s3_uri(Path("s3:/bucket"))


def test_parse_s3_uri_splits_bucket_and_prefix():
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://bucket/") == ("bucket", "")


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix", "s3://Bad_Bucket/x", "gs://b/x"])
def test_parse_s3_uri_rejects_malformed_uris_naming_them(uri):
    with pytest.raises(StorageError) as info:
        parse_s3_uri(uri)
    assert repr(uri) in str(info.value)


# ---------------------------------------------------------------- settings


def test_settings_read_from_env():
    settings = S3Settings.from_env(
        {
            "DFU_S3_ENDPOINT": "minio:9000",
            "DFU_S3_ACCESS_KEY": "ak",
            "DFU_S3_SECRET_KEY": SECRET,
            "DFU_S3_SECURE": "no",
            "DFU_S3_REGION": "eu-west-1",
        }
    )
    assert settings == S3Settings("minio:9000", "ak", SECRET, secure=False, region="eu-west-1")


def test_settings_default_to_tls_and_fall_back_to_aws_keys():
    settings = S3Settings.from_env(
        {
            "DFU_S3_ENDPOINT": "s3.example.com",
            "AWS_ACCESS_KEY_ID": "ak",
            "AWS_SECRET_ACCESS_KEY": SECRET,
        }
    )
    assert (settings.access_key, settings.secret_key, settings.secure) == ("ak", SECRET, True)
    assert settings.region is None


@pytest.mark.parametrize(
    "endpoint, secure_var, expected",
    [
        ("http://minio:9000", None, ("minio:9000", False)),
        ("https://minio:9000/", None, ("minio:9000", True)),
        ("HTTP://minio:9000", "false", ("minio:9000", False)),
    ],
)
def test_settings_strip_scheme_and_set_tls(endpoint, secure_var, expected):
    env = {"DFU_S3_ENDPOINT": endpoint, "DFU_S3_ACCESS_KEY": "a", "DFU_S3_SECRET_KEY": SECRET}
    if secure_var is not None:
        env["DFU_S3_SECURE"] = secure_var
    settings = S3Settings.from_env(env)
    assert (settings.endpoint, settings.secure) == expected


def test_settings_missing_endpoint_names_the_variable():
    with pytest.raises(StorageError) as info:
        S3Settings.from_env({"DFU_S3_ACCESS_KEY": "a", "DFU_S3_SECRET_KEY": SECRET})
    message = str(info.value)
    assert "DFU_S3_ENDPOINT" in message and "set" in message
    assert "DFU_S3_ACCESS_KEY" not in message


def test_settings_missing_everything_names_every_variable():
    with pytest.raises(StorageError) as info:
        S3Settings.from_env({})
    message = str(info.value)
    for name in (
        "DFU_S3_ENDPOINT",
        "DFU_S3_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "DFU_S3_SECRET_KEY",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert name in message


def test_settings_read_os_environ_by_default(monkeypatch):
    for name in ("DFU_S3_ENDPOINT", "DFU_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DFU_S3_SECRET_KEY", SECRET)
    with pytest.raises(StorageError, match="DFU_S3_ENDPOINT"):
        S3Settings.from_env()


@pytest.mark.parametrize("value", ["maybe", "2", "on"])
def test_settings_bad_secure_value_names_the_variable(value):
    env = {
        "DFU_S3_ENDPOINT": "m:9000",
        "DFU_S3_ACCESS_KEY": "a",
        "DFU_S3_SECRET_KEY": SECRET,
        "DFU_S3_SECURE": value,
    }
    with pytest.raises(StorageError) as info:
        S3Settings.from_env(env)
    assert "DFU_S3_SECURE" in str(info.value) and repr(value) in str(info.value)


def test_settings_reject_scheme_that_contradicts_secure_flag():
    env = {
        "DFU_S3_ENDPOINT": "http://m:9000",
        "DFU_S3_ACCESS_KEY": "a",
        "DFU_S3_SECRET_KEY": SECRET,
        "DFU_S3_SECURE": "true",
    }
    with pytest.raises(StorageError, match="DFU_S3_SECURE"):
        S3Settings.from_env(env)


@pytest.mark.parametrize("endpoint", ["minio:9000/bucket", "ftp://minio:9000", "http://"])
def test_settings_reject_endpoint_with_path_or_odd_scheme(endpoint):
    env = {"DFU_S3_ENDPOINT": endpoint, "DFU_S3_ACCESS_KEY": "a", "DFU_S3_SECRET_KEY": SECRET}
    with pytest.raises(StorageError, match="DFU_S3_ENDPOINT"):
        S3Settings.from_env(env)


def test_secret_never_in_repr_or_str():
    settings = S3Settings("m:9000", "ak", SECRET, secure=False)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert "ak" in repr(settings)


def test_secret_not_in_configuration_errors():
    with pytest.raises(StorageError) as info:
        S3Settings.from_env({"DFU_S3_SECRET_KEY": SECRET, "DFU_S3_ACCESS_KEY": "ak"})
    assert SECRET not in str(info.value)
    with pytest.raises(StorageError) as info:
        S3Settings.from_env(
            {
                "DFU_S3_ENDPOINT": "m:1",
                "DFU_S3_SECRET_KEY": SECRET,
                "DFU_S3_ACCESS_KEY": "ak",
                "DFU_S3_SECURE": "perhaps",
            }
        )
    assert SECRET not in str(info.value)


# ---------------------------------------------------------------- trees through S3


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_marker(client, key):
    return json.loads(client.get_object("data", key).read())


def version_key(client, prefix: str, relative: str) -> str:
    """Where upload_tree put ``relative`` of the tree at ``prefix``: its current version."""
    version = read_marker(client, f"{prefix}/_SUCCESS")["version"]
    return f"{prefix}/_versions/{version}/{relative}"


def test_nested_tree_round_trips_through_s3(client, tmp_path):
    source = make_tree(tmp_path / "src")
    upload_tree(source, "s3://data/sets/v1")

    marker = read_marker(client, "sets/v1/_SUCCESS")
    assert marker["format"] == "dfu-kfp-tree/2"
    assert marker["files"] == {k: {"size": len(v), "sha256": sha256(v)} for k, v in TREE.items()}
    keys = sorted(o.object_name for o in client.list_objects("data", recursive=True))
    version = f"sets/v1/_versions/{marker['version']}/"
    assert keys == sorted([version + k for k in TREE] + ["sets/v1/_SUCCESS"])

    result = download_tree("s3://data/sets/v1/", tmp_path / "out" / "copy")
    assert result == tmp_path / "out" / "copy"
    # The marker and the version folder are storage details, not handed to the caller as data.
    assert read_tree(result) == TREE
    # No staging folders are left beside the destination.
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["copy"]


def test_upload_tree_writes_marker_last(client, tmp_path):
    upload_tree(make_tree(tmp_path / "src"), "s3://data/v1")
    stamps = {o.object_name: o.last_modified for o in client.list_objects("data", recursive=True)}
    assert stamps["v1/_SUCCESS"] >= max(stamps.values())


def test_prefix_does_not_match_sibling_with_longer_name(client, tmp_path):
    upload_tree(make_tree(tmp_path / "a", {"x.txt": b"a"}), "s3://data/set")
    upload_tree(make_tree(tmp_path / "b", {"y.txt": b"bb"}), "s3://data/set2")
    assert read_tree(download_tree("s3://data/set", tmp_path / "out")) == {"x.txt": b"a"}


def test_whole_bucket_round_trip(client, tmp_path):
    upload_tree(make_tree(tmp_path / "src"), "s3://data")
    assert read_tree(download_tree("s3://data", tmp_path / "out")) == TREE


def test_download_of_missing_prefix_is_an_error(client, tmp_path):
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/nothing/here", tmp_path / "out", allow_unmarked=True)
    assert "no objects under s3://data/nothing/here" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_marker_catches_deleted_file(client, tmp_path):
    upload_tree(make_tree(tmp_path / "src"), "s3://data/v1")
    client.remove_object("data", version_key(client, "v1", "images/b/002.png"))
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/v1", tmp_path / "out")
    message = str(info.value)
    assert "images/b/002.png" in message and "_SUCCESS" in message and "missing" in message
    assert "s3://data/v1" in message and "upload the tree again" in message
    # A failed download publishes nothing.
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out.tmp-*")) == []
    assert not tree_is_complete("s3://data/v1")


def test_marker_catches_truncated_file(client, tmp_path):
    upload_tree(make_tree(tmp_path / "src"), "s3://data/v1")
    client.put_object("data", version_key(client, "v1", "labels.csv"), io.BytesIO(b"id,la"), 5)
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/v1", tmp_path / "out")
    message = str(info.value)
    assert "labels.csv" in message and "5 bytes" in message
    assert f"{len(TREE['labels.csv'])} bytes" in message
    assert not tree_is_complete("s3://data/v1")


def test_marker_catches_a_changed_file_of_the_same_size(client, tmp_path):
    upload_tree(make_tree(tmp_path / "src"), "s3://data/v1")
    forged = b"\x89PNG" + b"\xff" * 3000
    key = version_key(client, "v1", "images/b/002.png")
    client.put_object("data", key, io.BytesIO(forged), len(forged))
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/v1", tmp_path / "out")
    message = str(info.value)
    assert "images/b/002.png" in message and "SHA-256" in message
    assert sha256(forged)[:12] in message and sha256(TREE["images/b/002.png"])[:12] in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "marker, complaint",
    [
        (b"not json", "is malformed"),
        (json.dumps({"files": {"labels.csv": 18}}).encode(), "format None"),
        (
            json.dumps({"format": "dfu-kfp-tree/2", "version": "v", "files": []}).encode(),
            "malformed",
        ),
        (
            json.dumps(
                {"format": "dfu-kfp-tree/2", "version": "../x", "files": {"a": {"size": 1}}}
            ).encode(),
            "malformed",
        ),
        (
            json.dumps(
                {"format": "dfu-kfp-tree/2", "version": "v", "files": {"a": {"size": 1}}}
            ).encode(),
            "malformed",
        ),
    ],
)
def test_malformed_or_old_marker_is_reported(client, tmp_path, marker, complaint):
    upload_tree(make_tree(tmp_path / "src"), "s3://data/v1")
    client.put_object("data", "v1/_SUCCESS", io.BytesIO(marker), len(marker))
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/v1", tmp_path / "out")
    message = str(info.value)
    assert "_SUCCESS marker under s3://data/v1" in message and complaint in message
    assert "upload the tree again" in message
    assert not tree_is_complete("s3://data/v1")


def put_raw(client, prefix, files):
    """Objects written as another tool (aws s3 cp, KFP's launcher) writes them: no marker."""
    for relative, data in files.items():
        client.put_object("data", f"{prefix}/{relative}", io.BytesIO(data), len(data))


def test_tree_without_marker_is_refused_unless_allowed(client, tmp_path):
    put_raw(client, "raw", {"a/b.txt": b"abc"})
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/raw", tmp_path / "out")
    assert "s3://data/raw has no _SUCCESS marker" in str(info.value)
    assert "dfu-kfp upload" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not tree_is_complete("s3://data/raw")


def test_tree_without_marker_is_read_with_a_warning_when_allowed(client, tmp_path, capsys):
    put_raw(client, "raw", {"a/b.txt": b"abc", "c.txt": b"c"})
    client.put_object("data", "raw/folder/", io.BytesIO(b""), 0)  # a folder placeholder
    result = download_tree("s3://data/raw", tmp_path / "out", allow_unmarked=True)
    assert read_tree(result) == {"a/b.txt": b"abc", "c.txt": b"c"}
    warning = capsys.readouterr().err
    assert warning.startswith("warning: s3://data/raw has no _SUCCESS marker")
    assert "2 objects" in warning and "dfu-kfp upload" in warning


def test_an_unfinished_upload_is_never_read_even_where_unmarked_trees_are(client, tmp_path):
    put_raw(client, "half", {"_versions/20260101T000000000000Z-0000abcd/a.txt": b"a"})
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/half", tmp_path / "out", allow_unmarked=True)
    message = str(info.value)
    assert "s3://data/half holds an unfinished upload" in message
    assert "dfu-kfp upload DIR s3://data/half" in message
    assert not (tmp_path / "out").exists()


def test_reupload_replaces_the_tree_and_removes_the_old_version(client, tmp_path):
    upload_tree(make_tree(tmp_path / "one", {"a.txt": b"1", "gone.txt": b"x"}), "s3://data/v")
    first = read_marker(client, "v/_SUCCESS")["version"]
    upload_tree(make_tree(tmp_path / "two", {"a.txt": b"22", "b.txt": b"3"}), "s3://data/v")
    marker = read_marker(client, "v/_SUCCESS")
    assert marker["files"] == {
        "a.txt": {"size": 2, "sha256": sha256(b"22")},
        "b.txt": {"size": 1, "sha256": sha256(b"3")},
    }
    keys = {o.object_name for o in client.list_objects("data", prefix="v/", recursive=True)}
    assert not any(first in key for key in keys)
    # A file that the new tree does not have is not handed out with it.
    assert read_tree(download_tree("s3://data/v", tmp_path / "out")) == {
        "a.txt": b"22",
        "b.txt": b"3",
    }


def test_if_absent_leaves_a_complete_tree_alone(client, tmp_path):
    assert upload_tree(make_tree(tmp_path / "one", {"a.txt": b"1"}), "s3://data/v", if_absent=True)
    before = sorted((o.object_name, o.etag) for o in client.list_objects("data", recursive=True))
    again = make_tree(tmp_path / "two", {"a.txt": b"2"})
    assert upload_tree(again, "s3://data/v", if_absent=True) is False
    after = sorted((o.object_name, o.etag) for o in client.list_objects("data", recursive=True))
    assert after == before


def test_tree_is_complete_needs_a_valid_marker_and_every_object(client, tmp_path):
    assert not tree_is_complete("s3://data/v")
    assert not tree_is_complete("s3://no-such-bucket/v")
    upload_tree(make_tree(tmp_path / "src"), "s3://data/v")
    assert tree_is_complete("s3://data/v")


def test_upload_of_empty_folder_is_an_error(client, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="holds no files"):
        upload_tree(tmp_path / "empty", "s3://data/v")


def test_endpoint_with_http_scheme_is_accepted(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("DFU_S3_ENDPOINT", "http://" + s3_env["DFU_S3_ENDPOINT"])
    monkeypatch.delenv("DFU_S3_SECURE")
    settings = S3Settings.from_env()
    assert settings.secure is False
    ensure_bucket(make_client(settings), "data")
    upload_tree(make_tree(tmp_path / "src"), "s3://data/v1")
    assert read_tree(download_tree("s3://data/v1", tmp_path / "out")) == TREE


def test_explicit_settings_override_environment(s3_env, monkeypatch, tmp_path):
    settings = S3Settings.from_env()
    monkeypatch.delenv("DFU_S3_ENDPOINT")
    ensure_bucket(make_client(settings), "data")
    upload_tree(make_tree(tmp_path / "src"), "s3://data/v1", settings=settings)
    out = download_tree("s3://data/v1", tmp_path / "out", settings=settings)
    assert read_tree(out) == TREE


# ---------------------------------------------------------------- single objects and buckets


def test_single_file_round_trip(client, tmp_path):
    source = tmp_path / "model.keras"
    source.write_bytes(b"weights" * 1000)
    upload_file(source, "s3://data/models/model.keras")
    target = download_file("s3://data/models/model.keras", tmp_path / "dl" / "m.keras")
    assert target.read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["m.keras"]


def test_download_of_missing_object_names_it(client, tmp_path):
    with pytest.raises(StorageError) as info:
        download_file("s3://data/models/none.keras", tmp_path / "m.keras")
    assert "s3://data/models/none.keras" in str(info.value)
    assert "does not exist" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_file_uri_needs_a_key(client, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="no object key"):
        upload_file(tmp_path / "f", "s3://data/")


def test_ensure_bucket_is_idempotent(s3_env):
    client = make_client(S3Settings.from_env())
    ensure_bucket(client, "fresh")
    ensure_bucket(client, "fresh")
    assert client.bucket_exists("fresh")


@pytest.mark.parametrize("operation", ["download_tree", "upload_tree", "upload_file"])
def test_missing_bucket_is_named(s3_env, tmp_path, operation):
    source = make_tree(tmp_path / "src")
    with pytest.raises(StorageError) as info:
        if operation == "download_tree":
            download_tree("s3://no-such-bucket/v1", tmp_path / "out")
        elif operation == "upload_tree":
            upload_tree(source, "s3://no-such-bucket/v1")
        else:
            upload_file(source / "labels.csv", "s3://no-such-bucket/labels.csv")
    assert "'no-such-bucket' does not exist" in str(info.value)


# ---------------------------------------------------------------- copy_tree


def test_copy_tree_between_all_location_kinds(client, tmp_path):
    source = make_tree(tmp_path / "src")
    copy_tree(source, "s3://data/a")  # local -> s3
    copy_tree("s3://data/a", "s3://data/b")  # s3 -> s3
    copy_tree("s3://data/b", tmp_path / "from-s3")  # s3 -> local
    copy_tree(tmp_path / "from-s3", tmp_path / "local-copy")  # local -> local
    assert read_tree(tmp_path / "local-copy") == TREE
    keys = {o.object_name for o in client.list_objects("data", prefix="b/", recursive=True)}
    assert "b/_SUCCESS" in keys and version_key(client, "b", "labels.csv") in keys


def test_local_copy_into_existing_folder_keeps_other_files(tmp_path):
    source = make_tree(tmp_path / "src")
    destination = make_tree(tmp_path / "dst", {"keep.txt": b"k", "labels.csv": b"old"})
    copy_tree(source, destination)
    assert read_tree(destination) == {**TREE, "keep.txt": b"k"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_local_copy_into_empty_existing_folder(tmp_path):
    (tmp_path / "dst").mkdir()
    copy_tree(make_tree(tmp_path / "src"), tmp_path / "dst")
    assert read_tree(tmp_path / "dst") == TREE


def test_local_copy_failure_leaves_destination_absent(tmp_path, monkeypatch):
    source = make_tree(tmp_path / "src")

    def broken_copytree(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage.shutil, "copytree", broken_copytree)
    with pytest.raises(OSError):
        copy_tree(source, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------- local paths everywhere


def test_local_paths_work_for_every_function(tmp_path, monkeypatch):
    # No S3 configuration at all: local paths must never need it.
    for name in ("DFU_S3_ENDPOINT", "DFU_S3_ACCESS_KEY", "DFU_S3_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    source = make_tree(tmp_path / "src")

    assert download_tree(source, tmp_path / "unused") == source
    assert not (tmp_path / "unused").exists()

    upload_tree(source, tmp_path / "uploaded")
    assert read_tree(tmp_path / "uploaded") == TREE

    upload_file(source / "labels.csv", str(tmp_path / "one" / "labels.csv"))
    assert (tmp_path / "one" / "labels.csv").read_bytes() == TREE["labels.csv"]

    target = download_file(str(source / "labels.csv"), tmp_path / "two" / "l.csv")
    assert target.read_bytes() == TREE["labels.csv"]


def test_missing_local_sources_are_errors(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        download_tree(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(StorageError, match="does not exist"):
        upload_tree(tmp_path / "missing", "s3://data/x")
    with pytest.raises(StorageError, match="does not exist"):
        copy_tree(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(StorageError, match="does not exist"):
        upload_file(tmp_path / "missing.txt", "s3://data/x")
    with pytest.raises(StorageError, match="does not exist"):
        download_file(str(tmp_path / "missing.txt"), tmp_path / "out.txt")


# ---------------------------------------------------------------- connection failures


def test_unreachable_endpoint_names_the_endpoint(monkeypatch, tmp_path):
    port = closed_port()
    monkeypatch.setenv("DFU_S3_ENDPOINT", f"127.0.0.1:{port}")
    monkeypatch.setenv("DFU_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("DFU_S3_SECRET_KEY", SECRET)
    monkeypatch.setenv("DFU_S3_SECURE", "false")
    monkeypatch.setenv("DFU_S3_REGION", "us-east-1")
    # Short retries mean this raises within seconds; minio's defaults would take minutes.
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/v1", tmp_path / "out")
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "DFU_S3_ENDPOINT" in message and "cannot reach" in message
    assert SECRET not in message


class StubS3Handler(http.server.BaseHTTPRequestHandler):
    """Answers every request with one fixed status and body, counting requests."""

    status = 500
    body = b""
    content_type = "application/xml"
    requests = 0

    def _answer(self):
        type(self).requests += 1
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_s3(monkeypatch):
    """A tiny HTTP server that plays an S3 endpoint answering with a fixed error."""
    handler = type("Handler", (StubS3Handler,), {"requests": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DFU_S3_ENDPOINT", f"127.0.0.1:{server.server_port}")
    monkeypatch.setenv("DFU_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("DFU_S3_SECRET_KEY", SECRET)
    monkeypatch.setenv("DFU_S3_SECURE", "false")
    # A fixed region skips minio's bucket-location lookup so the stub sees only the real call.
    monkeypatch.setenv("DFU_S3_REGION", "us-east-1")
    yield handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"])
def test_wrong_credentials_are_explained(stub_s3, tmp_path, code):
    stub_s3.status = 403
    stub_s3.body = (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
        f"<Message>denied</Message><BucketName>data</BucketName></Error>"
    ).encode()
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/v1", tmp_path / "out")
    message = str(info.value)
    assert code in message and "credentials" in message
    assert "DFU_S3_ACCESS_KEY" in message and "DFU_S3_SECRET_KEY" in message
    assert "'data'" in message
    assert SECRET not in message


def test_server_errors_are_retried_then_reported(stub_s3, tmp_path):
    stub_s3.status = 503
    stub_s3.content_type = "text/plain"
    stub_s3.body = b"busy"
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/v1", tmp_path / "out")
    assert stub_s3.requests == 1 + storage.RETRIES
    assert "127.0.0.1" in str(info.value) and "503" in str(info.value)


def test_secret_echoed_by_the_server_is_redacted(stub_s3, tmp_path):
    stub_s3.status = 400
    stub_s3.body = (
        "<?xml version='1.0' encoding='UTF-8'?><Error><Code>InvalidArgument</Code>"
        f"<Message>bad header {SECRET}</Message></Error>"
    ).encode()
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/v1", tmp_path / "out")
    message = str(info.value)
    assert "InvalidArgument" in message and "bad header ***" in message
    assert SECRET not in message


@pytest.mark.parametrize("secret", ["b", "k3y", "s/+x=7", SECRET])
def test_any_secret_is_redacted_without_garbling_the_message(secret):
    settings = S3Settings("m:9000", "ak", secret, secure=False)
    message = f"bucket 'data' refused: bad header [{secret}] (x={secret})"
    # Whole words that merely contain the secret ("bucket", "bad" for "b") stay as they are.
    assert storage._redact(message, settings) == "bucket 'data' refused: bad header [***] (x=***)"


def test_signature_and_credential_fields_are_redacted():
    message = (
        "PUT /data/x?X-Amz-Credential=AKIA%2F20260101&X-Amz-Signature=abc123 failed; "
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIA/20260101/us-east-1, Signature=f00d"
    )
    redacted = storage._redact(message, None)
    for leaked in ("AKIA%2F20260101", "abc123", "AWS4-HMAC-SHA256", "AKIA/20260101", "f00d"):
        assert leaked not in redacted
    assert "X-Amz-Signature=***" in redacted and "Signature=***" in redacted
    assert redacted.startswith("PUT /data/x?") and "failed;" in redacted


def test_a_short_secret_echoed_by_the_server_is_redacted(stub_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("DFU_S3_SECRET_KEY", "pw")
    stub_s3.status = 400
    stub_s3.body = (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InvalidArgument</Code>"
        b"<Message>bad header pw</Message></Error>"
    )
    with pytest.raises(StorageError) as info:
        download_tree("s3://data/v1", tmp_path / "out")
    assert "InvalidArgument" in str(info.value) and "bad header ***" in str(info.value)


def test_dfu_kfp_upload_writes_a_verified_tree(client, tmp_path, capsys):
    from pipelines.cli import main

    source = make_tree(tmp_path / "src")
    assert main(["upload", str(source), "s3://data/study"]) == 0
    assert "uploaded" in capsys.readouterr().out
    assert tree_is_complete("s3://data/study")
    assert read_tree(download_tree("s3://data/study", tmp_path / "out")) == TREE
    assert main(["upload", str(tmp_path / "missing"), "s3://data/study"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: local folder") and "missing" in line
