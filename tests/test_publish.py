"""Model ids and publishing: the id follows the experiment, the code and the data's content
(never a location), and a published id is never rewritten."""

import json
import shutil

import numpy as np
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


def _bundle(folder, blessed=True, model="dfu-0.1.0-0123456789abcdef"):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model_id": model, "blessed": blessed}))
    (folder / "weights.bin").write_bytes(np.arange(10, dtype="uint8").tobytes())
    return folder


def test_publishing_an_existing_id_is_a_no_op_that_says_so(tmp_path, capsys):
    from components.publish import run_publish

    models = tmp_path / "models"
    target = run_publish(_bundle(tmp_path / "a"), str(models))
    assert target.endswith("/dfu-0.1.0-0123456789abcdef") and "published" in capsys.readouterr().out
    again = _bundle(tmp_path / "b")
    (again / "weights.bin").write_bytes(b"other weights")
    assert run_publish(again, str(models)) == target
    assert "already published" in capsys.readouterr().out
    assert (models / "dfu-0.1.0-0123456789abcdef" / "weights.bin").read_bytes() == bytes(range(10))


def test_an_unblessed_bundle_is_never_published(tmp_path, capsys):
    from components.publish import run_publish

    assert run_publish(_bundle(tmp_path / "a", blessed=False), str(tmp_path / "models")) == ""
    assert "NOT PUBLISHED" in capsys.readouterr().out
    assert not (tmp_path / "models").exists()


@pytest.mark.usefixtures("s3_env")
def test_publishing_to_s3_twice_writes_once(tmp_path):
    from components.publish import run_publish
    from dfu_ml.storage import S3Settings, ensure_bucket, make_client

    client = make_client(S3Settings.from_env())
    ensure_bucket(client, "dfu-models")
    target = run_publish(_bundle(tmp_path / "a"), "s3://dfu-models/runs")
    key = "runs/dfu-0.1.0-0123456789abcdef/weights.bin"
    first = client.stat_object("dfu-models", key).etag
    again = _bundle(tmp_path / "b")
    (again / "weights.bin").write_bytes(b"other weights")
    assert run_publish(again, "s3://dfu-models/runs") == target
    assert client.stat_object("dfu-models", key).etag == first
