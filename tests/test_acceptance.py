"""The backend acceptance check (pipelines/acceptance.py): every compiled variant passes, and
hand-broken copies, each with one defect a KFP backend rejects or silently mis-runs, are each
rejected with a message that names the defect."""

import copy
import re

import pytest
import yaml

from dfu_ml.config import load_config
from pipelines.acceptance import check_pipeline, check_run_arguments
from pipelines.pipeline import compile_pipeline, expected_placement
from pipelines.run_parameters import MAIN

VARIANTS = {
    "paper": ("paper", []),
    "smoke": ("smoke", []),
    "metadata-only": ("paper", ["modalities=metadata"]),
    "three-modalities": ("paper", ["modalities=metadata,depth_rgb,depth_map,thermal_map"]),
    "images-only": ("smoke", ["modalities=depth_rgb"]),
}


def _check(text: str) -> list[str]:
    return check_pipeline(text, expected_placement(), MAIN.kfp_types())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Each variant's compiled YAML text."""
    root = tmp_path_factory.mktemp("compiled")
    return {
        name: compile_pipeline(load_config(profile, overrides), root / f"{name}.yaml").read_text()
        for name, (profile, overrides) in VARIANTS.items()
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_compiled_variant_is_accepted(compiled, variant):
    assert _check(compiled[variant]) == []


def _broken(text: str, damage) -> str:
    spec, platform = [copy.deepcopy(d) for d in yaml.safe_load_all(text)]
    damage(spec, platform)
    return yaml.safe_dump_all([spec, platform])


def _tasks(spec):
    for component in [spec["root"], *spec["components"].values()]:
        yield from component.get("dag", {}).get("tasks", {}).items()


def _rename_consumed_artifact_key(spec, _platform):
    for _, task in _tasks(spec):
        for given in task.get("inputs", {}).get("artifacts", {}).values():
            if "taskOutputArtifact" in given:
                given["taskOutputArtifact"]["outputArtifactKey"] = "fold_plann"
                return
    raise AssertionError("no task consumes another task's artifact")


def _misspell_node_selector(_spec, platform):
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors["exec-stage1-fusion"]["nodeSelektor"] = executors["exec-stage1-fusion"].pop(
        "nodeSelector"
    )


def _drop_toleration(_spec, platform):
    del platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-stage2-finetune"][
        "tolerations"
    ]


def _cpu_step_on_gpu_nodes(_spec, platform):
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors["exec-evaluate-folds"] = {"nodeSelector": {"labels": {"dfu-kfp/node-pool": "gpu"}}}


def _unknown_dependency(spec, _platform):
    spec["root"]["dag"]["tasks"]["evaluate-folds"]["dependentTasks"].append("no-such-task")


def _wrong_parameter_type(spec, _platform):
    spec["root"]["inputDefinitions"]["parameters"]["cv_folds"]["parameterType"] = "STRING"


def _wrong_default(spec, _platform):
    spec["root"]["inputDefinitions"]["parameters"]["cv_folds"]["defaultValue"] = "five"


def _missing_component(spec, _platform):
    del spec["components"]["comp-make-fold-plan"]


def _missing_executor(spec, _platform):
    del spec["deploymentSpec"]["executors"]["exec-prepare-data"]


def _old_schema(spec, _platform):
    spec["schemaVersion"] = "2.0.0"


def _unknown_task_field(spec, _platform):
    spec["root"]["dag"]["tasks"]["prepare-data"]["retryPolicyy"] = {"maxRetryCount": 3}


def _secret_lost(_spec, platform):
    del platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-prepare-data"][
        "secretAsEnv"
    ]


def _runs_as_root(_spec, platform):
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors["exec-evaluate-folds"]["securityContext"] = {"runAsUser": 0}


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_missing_component, "component 'comp-make-fold-plan' does not exist"),
        (_missing_executor, "executor 'exec-prepare-data' is not in deploymentSpec"),
        (_rename_consumed_artifact_key, "reads artifact 'fold_plann'"),
        (_misspell_node_selector, "nodeSelektor"),
        (_drop_toleration, "GPU step without a toleration"),
        (_cpu_step_on_gpu_nodes, "a CPU step asks for a GPU, a node selector or a toleration"),
        (_wrong_parameter_type, "run parameter 'cv_folds' is STRING, expected NUMBER_INTEGER"),
        (_wrong_default, "run parameter 'cv_folds': default"),
        (_unknown_dependency, "depends on task 'no-such-task'"),
        (_old_schema, "schemaVersion '2.0.0'"),
        (_unknown_task_field, "retryPolicyy"),
        (_secret_lost, "does not get the secret 'dfu-kfp-s3'"),
        (
            _runs_as_root,
            "exec-evaluate-folds (evaluate-folds): does not run as the images' non-root",
        ),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_a_broken_copy_is_rejected_with_a_clear_message(compiled, damage, expected):
    problems = _check(_broken(compiled["paper"], damage))
    assert any(expected in p for p in problems), problems


def test_run_creation_checks_arguments(compiled):
    spec = next(yaml.safe_load_all(compiled["paper"]))
    assert check_run_arguments(spec, {"data": "s3://b/p", "cv_folds": 2, "folds": [0]}) == []
    problems = check_run_arguments(spec, {"cv_folds": "two", "fold": [0]})
    assert "run argument 'fold' is not a run parameter" in problems
    assert any("cv_folds='two' is not a NUMBER_INTEGER" in p for p in problems)
    assert "required run parameter 'data' has no value" in problems


CACHE_CLAIM = "dfu-compile-cache"


@pytest.fixture(scope="module")
def compiled_with_cache(tmp_path_factory):
    """The paper variant compiled with a compilation-cache claim, and its expected placement."""
    from pipelines.settings import RuntimeSettings

    runtime = RuntimeSettings(compile_cache_pvc=CACHE_CLAIM, compile_cache_path="/cache")
    path = tmp_path_factory.mktemp("cache") / "paper.yaml"
    return compile_pipeline(load_config("paper"), path, runtime).read_text(), runtime


def test_compilation_cache_claim_lands_on_exactly_the_gpu_steps(compiled_with_cache):
    text, runtime = compiled_with_cache
    assert check_pipeline(text, expected_placement(runtime), MAIN.kfp_types()) == []
    spec, platform = yaml.safe_load_all(text)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {name for name, e in executors.items() if e.get("pvcMount")}
    gpu = {name for name in spec["deploymentSpec"]["executors"] if _is_gpu_executor(name)}
    assert mounted == gpu and gpu
    for name in gpu:
        (mount,) = executors[name]["pvcMount"]
        assert mount["mountPath"] == "/cache"
        env = {
            e["name"]: e["value"]
            for e in spec["deploymentSpec"]["executors"][name]["container"]["env"]
        }
        assert env["JAX_COMPILATION_CACHE_DIR"] == "/cache/jax"
        assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/cache/")
    # Without the claim expected, or with it expected but missing, the check says which step.
    problems = check_pipeline(text, expected_placement(), MAIN.kfp_types())
    assert any("stage1-fusion" in p and CACHE_CLAIM in p for p in problems), problems


def _is_gpu_executor(name: str) -> bool:
    from pipelines.pipeline import GPU_COMPONENTS

    return re.sub(r"-\d+$", "", name.removeprefix("exec-")) in GPU_COMPONENTS


def test_a_compilation_cache_claim_on_a_cpu_step_is_rejected(compiled_with_cache):
    text, runtime = compiled_with_cache

    def move_claim(_spec, platform):
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        executors["exec-evaluate-folds"] = {
            "pvcMount": executors["exec-stage2-finetune"].pop("pvcMount")
        }

    problems = check_pipeline(
        _broken(text, move_claim), expected_placement(runtime), MAIN.kfp_types()
    )
    assert any("exec-evaluate-folds" in p and "mounts claims" in p for p in problems), problems
    assert any(
        "exec-stage2-finetune " in p and "expected ['dfu-compile-cache']" in p for p in problems
    )
