"""Model bundles are verified before anything in them is loaded (issue 10, findings 3 and 10).

A bundle's manifest lists every other file with its size and SHA-256; a changed, truncated or
missing file is refused with one error line, and a crafted pickle is never unpickled. The whole
bundle is pinned by its digest (the SHA-256 of the manifest), which ``publish`` prints and
``predict --expect-digest`` checks. The bundles here are real: a metadata-only model trained by
the pipeline's own step functions.
"""

import hashlib
import json
import shutil

import pytest

from dfu_ml.bundle import MANIFEST, bundle_digest, load_bundle, verify_bundle
from dfu_ml.errors import DataError


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, synthetic_dir):
    """A metadata-only bundle assembled from a real fold: prepare, plan, forest, evaluate."""
    from components.clinical_rf import run_clinical_rf
    from components.evaluate import run_evaluate
    from components.prepare import run_prepare
    from components.publish import run_bundle
    from components.resample_alpha import run_resample_alpha
    from dfu_ml.config import load_config

    root = tmp_path_factory.mktemp("bundle")
    config = load_config("smoke", ["modalities=metadata", "rf_n_estimators=20", "cv_folds=2"])
    report = run_prepare(str(synthetic_dir), config, root / "prepared")
    run_resample_alpha(root / "prepared", 0, config, root / "plan")
    run_clinical_rf(root / "prepared", root / "plan", config, root / "rf")
    run_evaluate([root / "rf"], config, root / "eval")
    run_bundle(
        root / "rf",
        root / "eval",
        config,
        root / "bundle",
        data=str(synthetic_dir),
        data_digest=report["content_digest"],
        code_version="test",
    )
    return root / "bundle"


@pytest.fixture
def bundle(bundle_dir, tmp_path):
    """A private copy of the bundle, to damage."""
    return shutil.copytree(bundle_dir, tmp_path / "bundle")


class RunsCode:
    """A pickle that runs code when it is loaded: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the pickle ran')",)


def _craft_pickle(bundle, name, marker):
    import joblib

    joblib.dump(RunsCode(marker), bundle / name)


def _pickle_files(bundle):
    """The bundle's files that joblib or pickle would load (whatever the clinical model's file
    is called)."""
    return [p.name for p in bundle.iterdir() if p.suffix in (".joblib", ".pkl", ".pickle")]


def _predict(bundle, data, tmp_path, *extra):
    from pipelines.cli import main

    out = tmp_path / "predictions.csv"
    args = ["predict", "--model", str(bundle), "--data", str(data), "--out", str(out), *extra]
    return main(args), out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_the_manifest_lists_every_file_with_its_size_and_sha256(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    on_disk = {p.name for p in bundle.iterdir() if p.name != MANIFEST}
    assert set(manifest["files"]) == on_disk and _pickle_files(bundle)
    for name, entry in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert bundle_digest(bundle) == hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    assert verify_bundle(bundle, expected_digest=bundle_digest(bundle)) == manifest


def test_a_verified_bundle_predicts(bundle, synthetic_dir, tmp_path, capsys):
    digest = bundle_digest(bundle)
    code, out = _predict(bundle, synthetic_dir, tmp_path, "--expect-digest", f"sha256:{digest}")
    assert code == 0, capsys.readouterr().err
    assert out.read_text().count("\n") > 10
    assert load_bundle(bundle).manifest["model_id"].startswith("dfu-")


def test_a_crafted_pickle_in_a_bundle_never_runs(bundle, synthetic_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    for name in _pickle_files(bundle):
        _craft_pickle(bundle, name, marker)
    code, out = _predict(bundle, synthetic_dir, tmp_path)
    assert code == 2 and not out.exists()
    line = _one_error_line(capsys)
    assert str(bundle) in line and _pickle_files(bundle)[0] in line
    assert "bytes" in line or "SHA-256" in line
    assert not marker.exists(), "the crafted pickle ran"
    with pytest.raises(DataError):
        load_bundle(bundle)
    assert not marker.exists()


def test_a_forged_bundle_with_a_matching_manifest_is_refused_by_its_expected_digest(
    bundle, synthetic_dir, tmp_path, capsys
):
    """The manifest inside a bundle cannot catch a forger who rewrites it too; the digest
    recorded at publish time does."""
    published = bundle_digest(bundle)
    marker = tmp_path / "pwned"
    manifest = json.loads((bundle / MANIFEST).read_text())
    for name in _pickle_files(bundle):
        _craft_pickle(bundle, name, marker)
        data = (bundle / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    verify_bundle(bundle)  # consistent in itself
    code, _ = _predict(bundle, synthetic_dir, tmp_path, "--expect-digest", published)
    assert code == 2
    line = _one_error_line(capsys)
    assert published in line and "not the bundle that was published" in line
    assert not marker.exists(), "the crafted pickle ran"


def _truncate(bundle, name):
    path = bundle / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _same_size_change(bundle, name):
    path = bundle / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda b: (b / "config.json").unlink(), "config.json is missing"),
        (lambda b: _truncate(b, "config.json"), "config.json has"),
        (lambda b: _truncate(b, _pickle_files(b)[0]), "(truncated or replaced)"),
        (lambda b: _same_size_change(b, "config.json"), "does not match its SHA-256"),
        (lambda b: (b / MANIFEST).unlink(), "is not a dfu-kfp model bundle (no manifest.json)"),
        (lambda b: (b / MANIFEST).write_text("{"), "lists no file digests"),
        (
            lambda b: (b / MANIFEST).write_text(
                json.dumps({**json.loads((b / MANIFEST).read_text()), "files": ["config.json"]})
            ),
            "made by an older dfu-kfp",
        ),
        (
            lambda b: (b / MANIFEST).write_text(
                json.dumps(
                    {
                        **json.loads((b / MANIFEST).read_text()),
                        "files": {
                            k: v
                            for k, v in json.loads((b / MANIFEST).read_text())["files"].items()
                            if k != "config.json"
                        },
                    }
                )
            ),
            "does not list config.json",
        ),
        (
            lambda b: (b / MANIFEST).write_text(
                json.dumps(
                    {
                        **json.loads((b / MANIFEST).read_text()),
                        "files": {"../outside": {"size": 1, "sha256": "0" * 64}},
                    }
                )
            ),
            "invalid file name '../outside'",
        ),
    ],
    ids=[
        "missing-file",
        "truncated-config",
        "truncated-pickle",
        "changed-byte",
        "no-manifest",
        "manifest-not-json",
        "old-manifest",
        "needed-file-unlisted",
        "escaping-name",
    ],
)
def test_a_damaged_bundle_is_one_error_line_from_predict(
    bundle, synthetic_dir, tmp_path, capsys, damage, expected
):
    damage(bundle)
    code, out = _predict(bundle, synthetic_dir, tmp_path)
    assert code == 2 and not out.exists()
    line = _one_error_line(capsys)
    assert expected in line and str(bundle) in line


def test_a_damaged_bundle_is_never_published(bundle, tmp_path, capsys):
    from components.publish import run_publish

    _same_size_change(bundle, "config.json")
    with pytest.raises(DataError, match="config.json does not match its SHA-256"):
        run_publish(bundle, str(tmp_path / "models"))
    assert not (tmp_path / "models").exists()
