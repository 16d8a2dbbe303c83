"""Object storage under faults: the endpoint dies at every possible request of an upload or a
download (answering 503, or dropping the connection), and readers run in the middle of an
overwrite. No reader may ever accept a partial tree or a mixture of two (issue 10, finding 2).

The faults come from ``FaultProxy`` (tests/fault_proxy.py), a loopback proxy in front of the moto
S3 server that fails from the n-th request on; sweeping n over every request of an operation
covers every point where a real endpoint could die.
"""

import dataclasses
import json
from pathlib import Path

import pytest
from fault_proxy import FAULTS, FaultProxy

from dfu_ml import storage
from dfu_ml.errors import StorageError
from dfu_ml.storage import (
    S3Settings,
    download_tree,
    ensure_bucket,
    make_client,
    tree_is_complete,
    upload_tree,
)

OLD = {"a.txt": b"old a", "sub/c.bin": bytes(3000), "sub/d.txt": b"old d"}
NEW = {"a.txt": b"new a!", "sub/c.bin": bytes(range(256)) * 10, "e.txt": b"new e"}


def make_tree(root: Path, files: dict) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def s3(s3_env, monkeypatch):
    """The moto server with a bucket ``data``, and retries without waiting (each failed request
    is still retried RETRIES times, so the proxy sees the retries too)."""
    monkeypatch.setattr(storage, "BACKOFF_FACTOR_S", 0.0)
    ensure_bucket(make_client(S3Settings.from_env()), "data")
    return s3_env["DFU_S3_ENDPOINT"]


def through(proxy: FaultProxy) -> S3Settings:
    """Settings that reach the server through ``proxy``."""
    return dataclasses.replace(S3Settings.from_env(), endpoint=proxy.endpoint)


def count_requests(upstream: str, operation) -> int:
    with FaultProxy(upstream) as proxy:
        operation(through(proxy))
        return len(proxy.requests)


@pytest.fixture
def trees(tmp_path):
    return make_tree(tmp_path / "old", OLD), make_tree(tmp_path / "new", NEW)


@pytest.mark.parametrize("how", FAULTS)
def test_an_overwrite_cut_off_at_any_request_leaves_the_old_tree_or_the_new_one(
    s3, trees, tmp_path, how
):
    old, new = trees
    upload_tree(old, "s3://data/count")
    total = count_requests(s3, lambda st: upload_tree(new, "s3://data/count", settings=st))
    outcomes = []
    for n in range(total):
        uri = f"s3://data/cut{n}"
        upload_tree(old, uri)
        with FaultProxy(s3) as proxy:
            proxy.fail_from(n, how)
            try:
                upload_tree(new, uri, settings=through(proxy))
                switched = True
            except StorageError as exc:
                assert "uploading" in str(exc) and uri in str(exc)
                switched = False
        assert proxy.failed > 0, n
        seen = read_tree(download_tree(uri, tmp_path / f"read{n}"))
        # The writer's answer tells which: an error leaves the old tree, success the new one.
        assert seen == (NEW if switched else OLD), f"cut off at request {n} of {total}"
        assert tree_is_complete(uri)
        outcomes.append(switched)
    # Cut-offs before the marker keep the old tree, cut-offs in the clean-up after it do not.
    assert outcomes[0] is False and outcomes[-1] is True


@pytest.mark.parametrize("how", FAULTS)
def test_a_first_upload_cut_off_at_any_request_is_never_read(s3, trees, tmp_path, capsys, how):
    _, new = trees
    total = count_requests(s3, lambda st: upload_tree(new, "s3://data/count", settings=st))
    for n in range(total):
        uri = f"s3://data/first{n}"
        with FaultProxy(s3) as proxy:
            proxy.fail_from(n, how)
            try:
                upload_tree(new, uri, settings=through(proxy))
                switched = True
            except StorageError:
                switched = False
        destination = tmp_path / f"read{n}"
        if switched:
            assert read_tree(download_tree(uri, destination)) == NEW
            continue
        assert not tree_is_complete(uri)
        # Not even where trees without a marker are read (datasets, KFP artifacts).
        with pytest.raises(StorageError) as info:
            download_tree(uri, destination, allow_unmarked=True)
        assert uri in str(info.value)
        assert "unfinished upload" in str(info.value) or "no objects" in str(info.value)
        assert not destination.exists()
    assert "has no _SUCCESS marker" not in capsys.readouterr().err


@pytest.mark.parametrize("how", FAULTS)
def test_a_download_cut_off_at_any_request_fails_and_leaves_nothing(s3, trees, tmp_path, how):
    old, _ = trees
    upload_tree(old, "s3://data/v")
    total = count_requests(s3, lambda st: download_tree("s3://data/v", tmp_path / "n", settings=st))
    for n in range(total):
        destination = tmp_path / f"read{n}"
        with FaultProxy(s3) as proxy:
            proxy.fail_from(n, how)
            with pytest.raises(StorageError) as info:
                download_tree("s3://data/v", destination, settings=through(proxy))
        assert "downloading s3://data/v" in str(info.value)
        assert not destination.exists()
        assert list(tmp_path.glob(f".read{n}.tmp-*")) == []


def test_readers_during_an_overwrite_see_the_old_tree_until_the_switch_then_the_new(
    s3, trees, tmp_path
):
    """A reader runs before every single request of an overwrite (the writer waits meanwhile)."""
    old, new = trees
    upload_tree(old, "s3://data/v")
    total = count_requests(s3, lambda st: upload_tree(new, "s3://data/count", settings=st))
    seen = []

    def read_now(n):
        def read():
            seen.append(read_tree(download_tree("s3://data/v", tmp_path / f"during{n}")))

        return read

    with FaultProxy(s3) as proxy:
        for n in range(total):
            proxy.before(n, read_now(n))
        upload_tree(new, "s3://data/v", settings=through(proxy))
    assert len(seen) == total
    switch = seen.index(NEW)
    assert seen[:switch] == [OLD] * switch and seen[switch:] == [NEW] * (total - switch)
    assert 0 < switch < total


def test_a_download_restarts_when_the_tree_is_replaced_under_it(s3, trees, tmp_path):
    """A newer upload removes the version a reader is downloading: the reader starts again
    from the new marker and returns the new tree whole, never a mixture."""
    old, new = trees
    upload_tree(old, "s3://data/v")
    with FaultProxy(s3) as proxy:
        # Requests 0-2: bucket location, the marker, the first file; then the tree is replaced.
        proxy.before(3, lambda: upload_tree(new, "s3://data/v"))
        result = download_tree("s3://data/v", tmp_path / "out", settings=through(proxy))
        assert proxy.requests[1].startswith("GET /data/v/_SUCCESS")
    assert read_tree(result) == NEW
    assert sum("_SUCCESS" in r for r in proxy.requests) >= 3  # read, re-checked, read again


def test_a_tree_replaced_at_every_try_is_an_error_not_a_mixture(s3, trees, tmp_path):
    old, new = trees
    upload_tree(old, "s3://data/v")
    with FaultProxy(s3) as proxy:
        replacements = iter([new, old, new, old] * 2)
        for n in range(60):
            if n % 4 == 3:  # while each attempt downloads its files
                proxy.before(n, lambda: upload_tree(next(replacements), "s3://data/v"))
        with pytest.raises(StorageError) as info:
            download_tree("s3://data/v", tmp_path / "out", settings=through(proxy))
    assert "s3://data/v was replaced 3 times" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_failed_clean_up_after_the_switch_is_a_warning_not_an_error(s3, trees, tmp_path, capsys):
    old, new = trees
    upload_tree(old, "s3://data/v")
    requests = []
    with FaultProxy(s3) as proxy:
        upload_tree(new, "s3://data/count", settings=through(proxy))
        requests = list(proxy.requests)
    marker = next(i for i, r in enumerate(requests) if r.startswith("PUT /data/count/_SUCCESS"))
    with FaultProxy(s3) as proxy:
        proxy.fail_from(marker + 1)
        assert upload_tree(new, "s3://data/v", settings=through(proxy)) is True
    assert read_tree(download_tree("s3://data/v", tmp_path / "out")) == NEW
    err = capsys.readouterr().err
    assert "warning: s3://data/v was written, but its earlier versions are left over" in err


@pytest.mark.slow
def test_prepare_never_reads_a_dataset_whose_overwrite_was_cut_off(s3, tmp_path, capfd):
    """The issue's reproduction: the endpoint dies after 30 of a few hundred uploads while a dataset
    is overwritten; ``python -m components.prepare --data s3://...`` must then prepare the old
    dataset exactly (before: a mixture of old and new objects, exit 0)."""
    from components.prepare import main as prepare_main
    from components.prepare import run_prepare
    from dfu_ml.config import load_config
    from dfu_ml.data.prepare import REPORT_JSON
    from dfu_ml.data.synthetic import generate_synthetic_dataset

    old, new = tmp_path / "old", tmp_path / "new"
    generate_synthetic_dataset(old, patients=5, seed=2, image_scale=0.1)
    generate_synthetic_dataset(new, patients=5, seed=3, image_scale=0.1)
    config = load_config("smoke")

    def digest(folder):
        return run_prepare(str(folder), config, tmp_path / f"ref-{folder.name}")["content_digest"]

    def prepare_from_s3(name):
        code = prepare_main(["--data", uri, "--config", "smoke", "--out", str(tmp_path / name)])
        report = tmp_path / name / REPORT_JSON
        return code, json.loads(report.read_text())["content_digest"] if code == 0 else None

    old_digest = digest(old)
    ensure_bucket(make_client(S3Settings.from_env()), "dfu-data")
    uri = "s3://dfu-data/study"
    upload_tree(old, uri)
    with FaultProxy(s3) as proxy:
        proxy.fail_from(30, "drop")
        with pytest.raises(StorageError):
            upload_tree(new, uri, settings=through(proxy))
    assert sum(r.startswith("PUT") for r in proxy.requests) >= 25
    assert prepare_from_s3("after-cut") == (0, old_digest)
    capfd.readouterr()

    # A dataset copied with another tool (no marker, as `aws s3 cp` leaves it) is read, with a
    # warning that says so.
    uri = "s3://dfu-data/copied"
    client = make_client(S3Settings.from_env())
    for relative, path in sorted((p.relative_to(old).as_posix(), p) for p in old.rglob("*")):
        if path.is_file():
            client.fput_object("dfu-data", f"copied/{relative}", str(path))
    assert prepare_from_s3("copied") == (0, old_digest)
    assert "warning: s3://dfu-data/copied has no _SUCCESS marker" in capfd.readouterr().err

    # A first upload that was cut off is refused with one error line naming the prefix.
    uri = "s3://dfu-data/half"
    with FaultProxy(s3) as proxy:
        proxy.fail_from(30, "503")
        with pytest.raises(StorageError):
            upload_tree(new, uri, settings=through(proxy))
    assert prepare_from_s3("half") == (2, None)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "s3://dfu-data/half holds an unfinished upload" in err[0]
