"""The run configuration: defaults < profile (or YAML file, with extends) < key=value overrides."""

from pathlib import Path

import pytest
import yaml

from dfu_ml import config as cfg
from dfu_ml.config import Config, config_from_json, from_dict, load_config, parse_override
from dfu_ml.errors import ConfigError


def _profile(name: str) -> dict:
    return yaml.safe_load((cfg.PROFILE_DIR / f"{name}.yaml").read_text())


# --------------------------------------------------------------------------------------------
# Unknown keys and wrong types name the key


def test_unknown_key_from_dict_names_it():
    with pytest.raises(ConfigError, match="'cv_fold'"):
        from_dict({"cv_fold": 3})


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("cv_folds: 3\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="'learning_rat'") as info:
        load_config(str(path))
    assert str(path) in str(info.value)


def test_unknown_key_from_override_names_it():
    with pytest.raises(ConfigError, match="'imagesize'"):
        load_config("smoke", ["imagesize=32"])


@pytest.mark.parametrize(
    "key,value",
    [
        ("cv_folds", "three"),
        ("data_percentage", "half"),
        ("fusion_learnable", "maybe"),
        ("crop_margins", 5),
        ("modalities", 3),
        ("backbone", 7),
    ],
)
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        from_dict({key: value})


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("extends: smoke\ncv_folds: [1, 2]\n")
    with pytest.raises(ConfigError, match="'cv_folds'"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override,key",
    [
        ("cv_folds=1", "cv_folds"),
        ("modalities=metadata,colour", "modalities"),
        ("image_size=8", "image_size"),
        ("backbone=ResNet", "backbone"),
        ("data_percentage=0", "data_percentage"),
        ("on_missing_image=ignore", "on_missing_image"),
        ("seed=-1", "seed"),
        ("dropout=5", "dropout"),
        ("dropout=1", "dropout"),
        ("focal_gamma=-1", "focal_gamma"),
        ("crop_margins={depth_map: -500}", "crop_margins"),
        ("crop_margins={depth_map: abc}", "crop_margins"),
        ("crop_margins=abc", "crop_margins"),
        ("health_min_loss_drop=1", "health_min_loss_drop"),
        ("health_min_steps_per_epoch=0", "health_min_steps_per_epoch"),
        ("backbone_weights=imagenet", "backbone_weights"),  # with the default small_cnn
    ],
)
def test_out_of_range_or_choice_names_the_key(override, key):
    with pytest.raises(ConfigError, match=repr(key)):
        load_config(None, [override])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("cv_folds")


def test_unknown_profile_lists_the_profiles():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("no_such_profile")


# --------------------------------------------------------------------------------------------
# Profiles, extends and overrides


@pytest.mark.parametrize("name", ["smoke", "paper"])
def test_profiles_load_with_their_values(name):
    config = load_config(name)
    assert config.profile == name
    values = _profile(name)
    assert values  # premise: the profile sets something
    for key, value in values.items():
        assert getattr(config, key) == pytest.approx(value), key
    untouched = [k for k in cfg.FIELDS if k not in values and k != "profile"]
    for key in untouched[:10]:
        assert getattr(config, key) == getattr(Config(), key), key


def test_extends_a_profile(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("extends: smoke\ncv_folds: 4\n")
    config = load_config(str(path))
    smoke = load_config("smoke")
    assert config.cv_folds == 4 != smoke.cv_folds
    assert config.image_size == smoke.image_size == _profile("smoke")["image_size"]
    assert config.backbone == smoke.backbone
    assert config.profile == "small"


def test_extends_a_file_next_to_it_from_another_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "base.yaml").write_text("extends: smoke\ncv_folds: 4\n")
    (folder / "child.yaml").write_text("extends: base.yaml\nseed: 7\n")
    monkeypatch.chdir(tmp_path)  # not the folder that holds the files
    config = load_config(str(folder / "child.yaml"))
    assert (config.cv_folds, config.seed) == (4, 7)
    assert config.image_size == _profile("smoke")["image_size"]


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_override_parsing():
    assert parse_override("modalities=metadata") == ("modalities", "metadata")
    assert parse_override("cv_folds=2") == ("cv_folds", 2)
    assert parse_override("fusion_learnable=false") == ("fusion_learnable", False)
    # A string key keeps the text even when it looks like a number.
    assert parse_override("backbone_weights=123") == ("backbone_weights", "123")


def test_overrides_apply_over_the_profile():
    config = load_config("smoke", ["modalities=metadata", "cv_folds=2"])
    assert config.modalities == ["metadata"]
    assert config.cv_folds == 2
    assert config.image_modalities == [] and config.uses_metadata
    assert config.image_size == _profile("smoke")["image_size"]
    several = load_config("smoke", ["modalities=metadata,depth_rgb", "data_percentage=50"])
    assert several.modalities == ["metadata", "depth_rgb"]
    assert several.data_percentage == 50.0 and isinstance(several.data_percentage, float)
    assert several.image_modalities == ["depth_rgb"]


def test_a_partial_crop_margins_override_keeps_the_other_margins():
    config = load_config("smoke", ["crop_margins={depth_map: 20}"])
    assert config.crop_margins == {**Config().crop_margins, "depth_map": 20}


def test_override_dict_and_json_round_trip():
    config = load_config("paper", {"seed": 3})
    assert config.seed == 3
    assert config_from_json(config.to_json()) == config
    with pytest.raises(ConfigError):
        config_from_json("{not json")


def test_replace_validates():
    config = load_config("smoke")
    assert config.replace(cv_folds=4).cv_folds == 4
    with pytest.raises(ConfigError, match="'cv_folds'"):
        config.replace(cv_folds=0)


def test_profile_files_only_use_known_keys():
    for path in Path(cfg.PROFILE_DIR).glob("*.yaml"):
        values = yaml.safe_load(path.read_text()) or {}
        assert set(values) - {"extends"} <= set(cfg.FIELDS), path


# --------------------------------------------------------------------------------------------
# The clinical model's keys


@pytest.mark.parametrize(
    "override,message",
    [
        ("rf_min_samples_leaf=0", r"'rf_min_samples_leaf' must be in \[1, 1000\] \(.+\), got 0"),
        ("rf_n_estimators=0", r"'rf_n_estimators' must be in \[1, 5000\]"),
        ("rf_max_depth=-1", r"'rf_max_depth' must be in \[0, 1000\]"),
        ("rf_inner_folds=1", r"'rf_inner_folds' must be in \[2, 20\]"),
        ("clinical_model=svm", r"'clinical_model': 'svm' is not one of forest, boosting"),
        ("clinical_include_leak_suspect=sometimes", r"'clinical_include_leak_suspect' must be"),
        ("rf_min_samples_leaf=two", r"'rf_min_samples_leaf' must be an integer"),
    ],
)
def test_clinical_model_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_a_bad_clinical_key_is_one_error_line_from_the_main_command(capsys, tmp_path):
    from pipelines.cli import main

    code = main(["run", "--out", str(tmp_path), "--set", "rf_min_samples_leaf=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and "rf_min_samples_leaf" in err[0]


@pytest.mark.parametrize(
    "override,key",
    [
        ("mixed_precision=float16", "mixed_precision"),
        ("jit_compile=xla", "jit_compile"),
        ("predict_batch_size=0", "predict_batch_size"),
    ],
)
def test_execution_keys_are_checked(override, key):
    with pytest.raises(ConfigError, match=repr(key)):
        load_config(None, [override])


def test_gpu_profiles_run_mixed_precision_and_cpu_ones_do_not():
    for name in ("paper", "paper-scratch"):
        assert load_config(name).mixed_precision == "mixed_bfloat16"
    for name in ("smoke", None):
        assert load_config(name).mixed_precision == "none"
    assert load_config(None, ["jit_compile=compiled"]).jit_compile == "compiled"
