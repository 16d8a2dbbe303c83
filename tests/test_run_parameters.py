"""Run parameters: declared once (pipelines/run_parameters.py), resolved over the compiled
configuration, and every cluster command the README documents compiles, passes the backend
acceptance check and resolves."""

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dfu_ml.config import config_from_json, load_config
from dfu_ml.errors import ConfigError
from pipelines.run_parameters import DIAGNOSE, MAIN, SEARCH, for_pipeline, resolve_run

README = Path(__file__).resolve().parents[1] / "README.md"


def _resolve(config, tmp_path, parameters=MAIN, compiled=None, **values):
    """Run the generated resolve component's function as the pipeline's first step does
    (``compiled``: defaults fixed at compile time, such as a search's combinations)."""
    out = tmp_path / "config.json"
    runtime = SimpleNamespace(models_uri="")
    defaults = {
        name: p.default
        for name, p in parameters.signature(config, runtime, compiled).parameters.items()
        if p.default is not p.empty
    }
    arguments = {p.name: {**defaults, **values}[p.name] for p in parameters.resolved}
    folds = parameters.resolve_function()(
        config_json=config.to_json(),
        code_version="test",
        config=SimpleNamespace(path=str(out)),
        **arguments,
    )
    return folds, config_from_json(out.read_text())


def test_folds_follow_cv_folds_unless_given(tmp_path):
    paper = load_config("paper")
    assert _resolve(paper, tmp_path)[0] == [0, 1, 2, 3, 4]
    folds, resolved = _resolve(paper, tmp_path, cv_folds=2, data_percentage=40)
    assert folds == [0, 1] and resolved.cv_folds == 2 and resolved.data_percentage == 40
    assert _resolve(paper, tmp_path, cv_folds=3, folds=[2.0])[0] == [2]  # kfp.local's floats


def test_every_run_parameter_reaches_the_configuration(tmp_path):
    _, resolved = _resolve(
        load_config("paper"),
        tmp_path,
        image_modalities=["depth_map"],
        use_metadata=False,
        backbone="EfficientNetB0",
        pretrain_lr=0.003,
        seed=7,
        config_overrides=["dropout=0.1", "rf_n_estimators=60"],
    )
    assert resolved.modalities == ["depth_map"]
    assert (resolved.backbone, resolved.pretrain_lr, resolved.seed) == ("EfficientNetB0", 0.003, 7)
    assert (resolved.dropout, resolved.rf_n_estimators) == (0.1, 60)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"folds": [5]}, "run parameter 'folds' [5]: each fold must be in 0..4"),
        ({"folds": [0, 0]}, "appear once"),
        ({"image_modalities": [], "use_metadata": True}, "different DAGs"),
        ({"config_overrides": ["dropout=abc"]}, "dropout"),
        ({"config_overrides": ["no_such_key=1"]}, "unknown config key 'no_such_key'"),
        ({"cv_folds": 1}, "cv_folds"),
    ],
)
def test_bad_run_parameters_are_config_errors_naming_them(tmp_path, values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _resolve(load_config("paper"), tmp_path, **values)


def test_the_pipeline_signature_is_the_declared_list():
    config = load_config("paper")
    signature = MAIN.signature(config, SimpleNamespace(models_uri="s3://m/x"))
    assert set(signature.parameters) == {p.name for p in MAIN.parameters}
    assert signature.parameters["data"].default is signature.empty  # required
    assert signature.parameters["cv_folds"].default == config.cv_folds
    assert signature.parameters["models_uri"].default == "s3://m/x"
    assert set(resolve_run.__code__.co_varnames[:3]) == {"config_json", "values", "config_path"}


def _readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)
    lines = [
        line.strip()
        for block in blocks
        for line in block.replace("\\\n", " ").splitlines()
        # concrete commands, not usage synopses such as `dfu-kfp compile [--config FILE] ...`
        if line.strip().startswith(("kfp ", "dfu-kfp compile")) and "[" not in line.split("=")[0]
    ]
    return [shlex.split(line) for line in lines]


def test_every_documented_cluster_command_compiles_passes_acceptance_and_resolves(tmp_path):
    from kfp.cli.utils.parsing import parse_parameter_value

    from pipelines.acceptance import check_pipeline, check_run_arguments
    from pipelines.cli import build_parser, expectations

    commands = _readme_commands()
    compiles = [c for c in commands if c[0] == "dfu-kfp"]
    submits = [c for c in commands if c[0] == "kfp" and "create" in c]
    assert len(compiles) >= 2 and len(submits) >= 4, "the README's cluster examples are missing"
    compiled = {}
    for command in compiles:
        args = build_parser().parse_args(command[1:])
        output = tmp_path / args.output.name
        args.output = output
        args.func(args)
        compiled[output.name] = output
    for command in submits:
        assert "--endpoint" in command and "-n" in command, f"{command}: endpoint or namespace"
        package = compiled[command[command.index("-f") + 1]]
        arguments = {
            t.split("=", 1)[0]: parse_parameter_value(t.split("=", 1)[1])
            for t in command[command.index("create") + 1 :]
            if "=" in t and not t.startswith("-")
        }
        spec = next(yaml.safe_load_all(package.read_text()))
        name = spec["pipelineInfo"]["name"]
        assert check_pipeline(package, *expectations(name)) == [], command
        assert check_run_arguments(spec, arguments) == [], command
        config = config_from_json(
            spec["root"]["dag"]["tasks"]["resolve-config"]["inputs"]["parameters"]["config_json"][
                "runtimeValue"
            ]["constant"]
        )
        compiled_defaults = {
            n: p["defaultValue"]
            for n, p in spec["root"]["inputDefinitions"]["parameters"].items()
            if "defaultValue" in p
        }
        run_values = {k: v for k, v in arguments.items() if k not in ("data", "models_uri")}
        parameters = for_pipeline(name)
        folds, resolved = _resolve(config, tmp_path, parameters, compiled_defaults, **run_values)
        default_folds = compiled_defaults.get("folds")
        expected_folds = arguments.get("folds", default_folds) or list(range(resolved.cv_folds))
        assert folds == expected_folds, command
        for key, value in run_values.items():
            if hasattr(resolved, key):
                assert getattr(resolved, key) == value, (command, key)


def test_the_search_resolves_its_combinations_into_the_configuration(tmp_path):
    from dfu_ml.search import SearchSettings, all_combinations, search_config

    settings = SearchSettings.from_values(all_combinations())
    compiled = {"combinations": list(settings.combinations), "final_model": "ensemble"}
    compiled["bootstrap_replicates"] = 1000
    config = search_config(load_config("paper"), settings.combinations)
    folds, resolved = _resolve(config, tmp_path, SEARCH, compiled, cv_folds=3)
    assert folds == [0, 1, 2]
    assert resolved.modalities == ["metadata", "depth_rgb", "depth_map", "thermal_map"]
    _, fewer = _resolve(config, tmp_path, SEARCH, compiled, combinations=["thermal_map+metadata"])
    assert fewer.modalities == ["metadata", "thermal_map"]
    with pytest.raises(ConfigError, match="different DAGs"):
        _resolve(config, tmp_path, SEARCH, compiled, combinations=["metadata"])
    with pytest.raises(ConfigError, match="unknown modality 'thermal'"):
        _resolve(config, tmp_path, SEARCH, compiled, combinations=["thermal"])
    with pytest.raises(ConfigError, match="not among the combinations"):
        _resolve(config, tmp_path, SEARCH, compiled, final_model="thermal_rgb")
    assert for_pipeline("dfu-kfp-search") is SEARCH and for_pipeline("dfu-kfp") is MAIN


def test_compile_help_lists_every_run_parameter(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    text = capsys.readouterr().out
    for parameter in MAIN.parameters:
        assert f"  {parameter.name} (" in text


def test_readme_points_to_the_single_declaration():
    assert "pipelines/run_parameters.py" in README.read_text()


def test_the_diagnose_pipeline_trains_two_folds_by_default_and_keeps_its_modalities(tmp_path):
    smoke = load_config("smoke", ["modalities=metadata,depth_rgb"])
    assert _resolve(smoke, tmp_path, DIAGNOSE)[0] == [0, 1]
    assert _resolve(smoke, tmp_path, DIAGNOSE, folds=[])[0] == [0, 1, 2]
    names = {p.name for p in DIAGNOSE.parameters}
    assert not names & {"models_uri", "image_modalities", "use_metadata"}
    assert for_pipeline("dfu-kfp-diagnose") is DIAGNOSE and for_pipeline("dfu-kfp") is MAIN
    with pytest.raises(ConfigError, match="compiled for .* and trains exactly those"):
        _resolve(
            smoke, tmp_path, DIAGNOSE, config_overrides=["modalities=metadata,depth_rgb,depth_map"]
        )
