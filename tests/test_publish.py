"""Model ids and publishing: the id follows the experiment, the code and the data's content
(never a location), and a published id is never rewritten."""

import json
import shutil

import pytest

from dfu_ml.bundle import model_id
from dfu_ml.config import load_config
from dfu_ml.data.prepare import content_digest, prepare_dataset


def test_content_digest_follows_the_data_not_its_location(synthetic_dir, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(synthetic_dir, copy)
    first = prepare_dataset(synthetic_dir, image_size=32, modalities=["depth_rgb"])
    second = prepare_dataset(copy, image_size=32, modalities=["depth_rgb"])
    assert content_digest(first) == content_digest(second)
    second.images["depth_rgb"][0, 0, 0, 0] ^= 1
    assert content_digest(first) != content_digest(second)


def test_model_id_follows_experiment_code_and_data_only():
    config = load_config("smoke")
    base = model_id(config, "d" * 64, "0.1.0+abc")
    assert base == model_id(config.replace(profile="renamed"), "d" * 64, "0.1.0+abc")
    assert base != model_id(config.replace(seed=1), "d" * 64, "0.1.0+abc")
    assert base != model_id(config, "e" * 64, "0.1.0+abc")
    assert base != model_id(config, "d" * 64, "0.1.0+abd")


MODEL = "dfu-0.1.0-0123456789abcdef"


def _bundle(folder, blessed=True, model=MODEL, weights=bytes(range(10))):
    """A small bundle in the real layout: files, then a manifest that lists their digests."""
    from dfu_ml.bundle import MANIFEST, file_digests

    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(weights)
    (folder / "notes" / "about.txt").parent.mkdir()
    (folder / "notes" / "about.txt").write_text(f"trained as {model}")
    manifest = {"model_id": model, "blessed": blessed, "files": file_digests(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def _tree(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_publishing_an_existing_id_is_a_no_op_that_says_so(tmp_path, capsys):
    from components.publish import run_publish

    models = tmp_path / "models"
    first = _bundle(tmp_path / "a")
    target = run_publish(first, str(models))
    assert target.endswith(f"/{MODEL}") and "published" in capsys.readouterr().out
    again = _bundle(tmp_path / "b", weights=b"other weights")
    assert run_publish(again, str(models)) == target
    assert "already published" in capsys.readouterr().out
    assert _tree(models / MODEL) == _tree(first)


def test_an_unblessed_bundle_is_never_published(tmp_path, capsys):
    from components.publish import run_publish

    assert run_publish(_bundle(tmp_path / "a", blessed=False), str(tmp_path / "models")) == ""
    assert "NOT PUBLISHED" in capsys.readouterr().out
    assert not (tmp_path / "models").exists()


def test_a_local_publish_racing_another_leaves_the_first_in_place(tmp_path, monkeypatch, capsys):
    """B publishes the same id while A is still copying: A must not merge its files into B's."""
    from components.publish import run_publish
    from dfu_ml import storage

    models = tmp_path / "models"
    a = _bundle(tmp_path / "a", weights=b"A's weights")
    b = _bundle(tmp_path / "b", weights=b"B's weights, longer")
    copytree = storage.shutil.copytree

    def copy_then_let_b_publish(src, dst, *args, **kwargs):
        result = copytree(src, dst, *args, **kwargs)
        if src == a:
            assert run_publish(b, str(models)).endswith(MODEL)
        return result

    monkeypatch.setattr(storage.shutil, "copytree", copy_then_let_b_publish)
    assert run_publish(a, str(models)).endswith(MODEL)
    assert "already published" in capsys.readouterr().out
    assert _tree(models / MODEL) == _tree(b)
    assert sorted(p.name for p in models.iterdir()) == [MODEL]  # no staging folders left


def test_a_left_over_local_staging_folder_or_empty_target_is_not_a_publish(tmp_path, capsys):
    from components.publish import run_publish

    models = tmp_path / "models"
    (models / f".{MODEL}.tmp-crashed").mkdir(parents=True)
    (models / f".{MODEL}.tmp-crashed" / "weights.bin").write_bytes(b"half")
    (models / MODEL).mkdir()
    bundle = _bundle(tmp_path / "a")
    run_publish(bundle, str(models))
    assert "published" in capsys.readouterr().out
    assert _tree(models / MODEL) == _tree(bundle)


@pytest.fixture
def models_bucket(s3_env, monkeypatch):
    from dfu_ml import storage
    from dfu_ml.storage import S3Settings, ensure_bucket, make_client

    monkeypatch.setattr(storage, "BACKOFF_FACTOR_S", 0.0)
    client = make_client(S3Settings.from_env())
    ensure_bucket(client, "dfu-models")
    return client


def _objects(client):
    return sorted(
        (o.object_name, o.etag, o.last_modified)
        for o in client.list_objects("dfu-models", recursive=True)
    )


def _published(tmp_path, name, uri=f"s3://dfu-models/runs/{MODEL}"):
    from dfu_ml.storage import download_tree

    return _tree(download_tree(uri, tmp_path / name))


def test_publishing_to_s3_twice_writes_once(tmp_path, models_bucket, capsys):
    from components.publish import run_publish

    first = _bundle(tmp_path / "a")
    target = run_publish(first, "s3://dfu-models/runs")
    assert target == f"s3://dfu-models/runs/{MODEL}"
    before = _objects(models_bucket)
    assert run_publish(_bundle(tmp_path / "b", weights=b"other"), "s3://dfu-models/runs") == target
    assert "already published" in capsys.readouterr().out
    assert _objects(models_bucket) == before
    assert _published(tmp_path, "got") == _tree(first)


def _through(proxy):
    import dataclasses

    from dfu_ml.storage import S3Settings

    return dataclasses.replace(S3Settings.from_env(), endpoint=proxy.endpoint)


def test_an_s3_publish_cut_off_anywhere_is_not_published_and_publishing_again_completes_it(
    tmp_path, models_bucket, s3_env, monkeypatch, capsys
):
    """Every point where the endpoint can die during a first publish: the id must not count as
    published; publishing again completes it, and readers during that second publish see
    nothing or the whole bundle, never a part."""
    from fault_proxy import FaultProxy

    from components.publish import run_publish
    from dfu_ml import storage
    from dfu_ml.errors import StorageError
    from dfu_ml.storage import S3Settings, download_tree, tree_is_complete

    bundle = _bundle(tmp_path / "bundle")
    upstream = s3_env["DFU_S3_ENDPOINT"]
    connect, direct = storage._connect, S3Settings.from_env()
    with FaultProxy(upstream) as proxy:
        monkeypatch.setattr(
            storage, "_connect", lambda settings: connect(settings or _through(proxy))
        )
        run_publish(bundle, "s3://dfu-models/count")
        total = len(proxy.requests)
    for n in range(total):
        models = f"s3://dfu-models/cut{n}"
        target = f"{models}/{MODEL}"
        with FaultProxy(upstream) as proxy:
            proxy.fail_from(n)
            monkeypatch.setattr(
                storage, "_connect", lambda settings: connect(settings or _through(proxy))
            )
            try:
                run_publish(bundle, models)
                continue  # cut off only in the clean-up after the switch: published
            except StorageError:
                pass
        monkeypatch.setattr(storage, "_connect", connect)
        assert not tree_is_complete(target), n
        seen = []

        def read(n=n, target=target, seen=seen):
            try:
                destination = tmp_path / f"during{n}-{len(seen)}"
                seen.append(_tree(download_tree(target, destination, settings=direct)))
            except StorageError as exc:
                assert target in str(exc)
                seen.append(None)

        with FaultProxy(upstream) as proxy:
            for i in range(total + 5):
                proxy.before(i, read)
            monkeypatch.setattr(
                storage, "_connect", lambda settings: connect(settings or _through(proxy))
            )
            assert run_publish(bundle, models) == target
        monkeypatch.setattr(storage, "_connect", connect)
        assert "published" in capsys.readouterr().out
        assert set(map(str, seen)) <= {"None", str(_tree(bundle))} and seen[-1] == _tree(bundle)
        assert _published(tmp_path, f"got{n}", target) == _tree(bundle)
        versions = {
            o.object_name.split("/_versions/")[1].split("/")[0]
            for o in models_bucket.list_objects("dfu-models", prefix=f"cut{n}/", recursive=True)
            if "/_versions/" in o.object_name
        }
        assert len(versions) == 1, f"the cut-off publish at request {n} left objects behind"


def test_an_s3_publish_racing_another_leaves_the_first_in_place(
    tmp_path, models_bucket, s3_env, monkeypatch, capsys
):
    """B publishes the same id while A is uploading: A must not switch the marker to its own
    files (a rewrite), and must clean up after itself."""
    from fault_proxy import FaultProxy

    from components.publish import run_publish
    from dfu_ml import storage

    a = _bundle(tmp_path / "a", weights=b"A's weights")
    b = _bundle(tmp_path / "b", weights=b"B's weights, longer")
    connect = storage._connect
    published = {}

    def b_publishes():
        with monkeypatch.context() as patch:
            patch.setattr(storage, "_connect", connect)
            run_publish(b, "s3://dfu-models/runs")
            published["objects"] = _objects(models_bucket)

    with FaultProxy(s3_env["DFU_S3_ENDPOINT"]) as proxy:
        # Requests 0-1 ask whether the id is published, 2 the bucket's region, 3-5 upload A's
        # three files: B publishes after A's first file.
        proxy.before(4, b_publishes)
        monkeypatch.setattr(
            storage, "_connect", lambda settings: connect(settings or _through(proxy))
        )
        assert run_publish(a, "s3://dfu-models/runs") == f"s3://dfu-models/runs/{MODEL}"
    monkeypatch.setattr(storage, "_connect", connect)
    assert "objects" in published
    out = capsys.readouterr().out
    assert "already published" in out and out.count("published") >= 2
    assert _objects(models_bucket) == published["objects"]
    assert _published(tmp_path, "got") == _tree(b)
