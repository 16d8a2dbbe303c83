"""What a KFP backend checks when a compiled pipeline is uploaded and a run created, checked here.

Nobody on the team has a cluster at hand, and the SDK only parses what it wrote. A KFP 2.x backend
parses the PipelineSpec strictly and checks the schema version, that every component and executor
reference resolves, that every task dependency and every consumed output key exists, and the run
parameters' types and required values. Two things it lets through silently, so we check them
ourselves: a platform document that fails strict parsing is ignored on upload, and a step's
Kubernetes settings are read with unknown fields dropped at run time (a misspelt ``nodeSelector``
simply vanishes and a GPU step runs anywhere).

:func:`check_pipeline` returns the problems found (an empty list means accepted); every message
names the component, task, executor or parameter at fault. ``dfu-kfp check`` runs it on a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value

from dfu_ml.errors import DfuError

SCHEMA_VERSION = "2.1.0"


class PipelineRejected(DfuError):
    """A compiled pipeline that a KFP backend would reject (or silently mis-run)."""


@dataclass(frozen=True)
class ExpectedPlacement:
    """Which components must run where: GPU components get the accelerator, node selector and
    toleration and nothing else does; storage components get the S3 secret as environment; with
    ``gpu_pvc``, GPU components mount that claim (the compilation cache) and nothing else mounts
    any."""

    gpu_components: frozenset = frozenset()
    storage_components: frozenset = frozenset()
    gpu_node_selector: dict = field(default_factory=dict)  # empty: any non-empty selector
    secret_name: str = ""
    run_as_user: int | None = None  # every step runs as this non-root user (None: unchecked)
    gpu_pvc: str = ""  # empty: no step mounts a claim


def _parse(message, data: dict, what: str, problems: list) -> object | None:
    try:
        return json_format.ParseDict(data, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        problems.append(f"{what}: {exc}")
        return None


def load_documents(source: str | Path) -> tuple[dict, dict | None]:
    """The PipelineSpec document and the platform document (or None) of a compiled YAML."""
    text = Path(source).read_text() if isinstance(source, Path) else source
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise PipelineRejected(f"the pipeline is not valid YAML: {exc}") from None
    if not documents or not isinstance(documents[0], dict):
        raise PipelineRejected("the pipeline YAML holds no PipelineSpec document")
    return documents[0], documents[1] if len(documents) > 1 else None


def _base_component(name: str) -> str:
    """``comp-stage1-fusion-2`` -> ``stage1-fusion``: the component a numbered copy is of."""
    return re.sub(r"-\d+$", "", name.removeprefix("comp-"))


def _parameter_type_ok(parameter_type: int, value: Value) -> bool:
    from kfp.pipeline_spec.pipeline_spec_pb2 import ParameterType

    kind = value.WhichOneof("kind")
    types = ParameterType.ParameterTypeEnum
    if parameter_type == types.NUMBER_INTEGER:
        return kind == "number_value" and float(value.number_value).is_integer()
    return {
        types.NUMBER_DOUBLE: kind == "number_value",
        types.STRING: kind == "string_value",
        types.BOOLEAN: kind == "bool_value",
        types.LIST: kind == "list_value",
        types.STRUCT: kind == "struct_value",
    }.get(parameter_type, True)


def _check_component_graph(spec, problems: list) -> None:
    """References, dependencies and consumed keys, in the root DAG and every sub-DAG."""
    components = dict(spec.components)
    executors = set(_deployment_executors(spec, problems))
    for name, component in components.items():
        is_container = component.WhichOneof("implementation") == "executor_label"
        if is_container and component.executor_label not in executors:
            problems.append(
                f"component {name}: executor {component.executor_label!r} is not in "
                "deploymentSpec.executors"
            )
    for owner, component in [("root", spec.root), *components.items()]:
        if component.WhichOneof("implementation") != "dag":
            continue
        tasks = dict(component.dag.tasks)
        for task_name, task in tasks.items():
            where = f"{owner}: task {task_name}"
            ref = task.component_ref.name
            if ref not in components:
                problems.append(f"{where}: component {ref!r} does not exist")
                continue
            callee = components[ref]
            for dependency in task.dependent_tasks:
                if dependency not in tasks:
                    problems.append(
                        f"{where}: depends on task {dependency!r}, which does not exist"
                    )
            _check_task_inputs(where, task, callee, component, tasks, components, problems)
        _check_dag_outputs(owner, component, tasks, components, problems)


def _deployment_executors(spec, problems: list) -> dict:
    from kfp.pipeline_spec.pipeline_spec_pb2 import PipelineDeploymentConfig

    data = json_format.MessageToDict(spec.deployment_spec)
    deployment = _parse(PipelineDeploymentConfig(), data, "deploymentSpec", problems)
    return dict(deployment.executors) if deployment is not None else {}


def _check_task_inputs(where, task, callee, owner, tasks, components, problems) -> None:
    declared_parameters = callee.input_definitions.parameters
    declared_artifacts = callee.input_definitions.artifacts
    for name, given in task.inputs.parameters.items():
        if name not in declared_parameters:
            problems.append(f"{where}: input parameter {name!r} is not an input of its component")
        source = given.WhichOneof("kind")
        if source == "task_output_parameter":
            producer = given.task_output_parameter.producer_task
            key = given.task_output_parameter.output_parameter_key
            outputs = _outputs_of(producer, tasks, components)
            if outputs is None:
                problems.append(
                    f"{where}: input {name!r} reads task {producer!r}, which does not exist"
                )
            elif key not in outputs.parameters:
                problems.append(
                    f"{where}: input {name!r} reads output {key!r} of task {producer!r}, which "
                    f"has outputs {sorted(outputs.parameters)}"
                )
        elif (
            source == "component_input_parameter"
            and given.component_input_parameter not in owner.input_definitions.parameters
        ):
            problems.append(
                f"{where}: input {name!r} reads {given.component_input_parameter!r}, which the "
                "enclosing DAG does not take"
            )
    for name, given in task.inputs.artifacts.items():
        if name not in declared_artifacts:
            problems.append(f"{where}: input artifact {name!r} is not an input of its component")
        source = given.WhichOneof("kind")
        if source == "task_output_artifact":
            producer = given.task_output_artifact.producer_task
            key = given.task_output_artifact.output_artifact_key
            outputs = _outputs_of(producer, tasks, components)
            if outputs is None:
                problems.append(
                    f"{where}: input {name!r} reads task {producer!r}, which does not exist"
                )
            elif key not in outputs.artifacts:
                problems.append(
                    f"{where}: input {name!r} reads artifact {key!r} of task {producer!r}, which "
                    f"has artifacts {sorted(outputs.artifacts)}"
                )
        elif (
            source == "component_input_artifact"
            and given.component_input_artifact not in owner.input_definitions.artifacts
        ):
            problems.append(
                f"{where}: input {name!r} reads {given.component_input_artifact!r}, which the "
                "enclosing DAG does not take"
            )
    provided = set(task.inputs.parameters) | set(task.inputs.artifacts)
    iterated = task.parameter_iterator.item_input or task.artifact_iterator.item_input
    for name, parameter in declared_parameters.items():
        required = not parameter.is_optional and not parameter.HasField("default_value")
        if required and name not in provided and name != iterated:
            problems.append(f"{where}: required input parameter {name!r} is not given")
    for name, artifact in declared_artifacts.items():
        if not artifact.is_optional and name not in provided and name != iterated:
            problems.append(f"{where}: required input artifact {name!r} is not given")


def _outputs_of(producer: str, tasks: dict, components: dict):
    """The producer task's output definitions; None when the task or its component is missing
    (reported where the reference is checked)."""
    component = components.get(tasks[producer].component_ref.name) if producer in tasks else None
    return None if component is None else component.output_definitions


def _check_dag_outputs(owner, component, tasks, components, problems) -> None:
    outputs = component.dag.outputs
    for name, selector in outputs.parameters.items():
        if selector.WhichOneof("kind") == "value_from_parameter":
            producer = selector.value_from_parameter.producer_subtask
            key = selector.value_from_parameter.output_parameter_key
            produced = _outputs_of(producer, tasks, components)
            if produced is None or key not in produced.parameters:
                problems.append(
                    f"{owner}: DAG output {name!r} reads {producer}.{key}, which does not exist"
                )
    for name, selectors in outputs.artifacts.items():
        for selector in selectors.artifact_selectors:
            produced = _outputs_of(selector.producer_subtask, tasks, components)
            if produced is None or selector.output_artifact_key not in produced.artifacts:
                problems.append(
                    f"{owner}: DAG output {name!r} reads {selector.producer_subtask}."
                    f"{selector.output_artifact_key}, which does not exist"
                )


def _check_run_parameters(spec, expected_types: dict, problems: list) -> None:
    """Types and defaults of the run parameters; the required ones are reported by name."""
    from kfp.pipeline_spec.pipeline_spec_pb2 import ParameterType

    names = ParameterType.ParameterTypeEnum
    declared = spec.root.input_definitions.parameters
    for name, parameter in declared.items():
        type_name = names.Name(parameter.parameter_type)
        if parameter.parameter_type == names.PARAMETER_TYPE_ENUM_UNSPECIFIED:
            problems.append(f"run parameter {name!r} has no type")
        if name in expected_types and type_name != expected_types[name]:
            problems.append(
                f"run parameter {name!r} is {type_name}, expected {expected_types[name]}"
            )
        if parameter.HasField("default_value") and not _parameter_type_ok(
            parameter.parameter_type, parameter.default_value
        ):
            problems.append(
                f"run parameter {name!r}: default {json_format.MessageToJson(parameter.default_value)}"
                f" is not a {type_name}"
            )
    for name in expected_types:
        if name not in declared:
            problems.append(f"run parameter {name!r} is missing")


def required_run_parameters(spec: dict) -> list[str]:
    """Run parameters without a default: a run must give them."""
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    return sorted(
        n for n, p in declared.items() if not p.get("isOptional") and "defaultValue" not in p
    )


def check_run_arguments(spec: dict, arguments: dict) -> list[str]:
    """What run creation checks: every argument is a run parameter of the right type, and every
    required parameter is given."""
    from kfp.pipeline_spec.pipeline_spec_pb2 import ParameterType

    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    problems = [
        f"run argument {n!r} is not a run parameter" for n in arguments if n not in declared
    ]
    for name, value in arguments.items():
        if name in declared:
            kind = ParameterType.ParameterTypeEnum.Value(declared[name]["parameterType"])
            proto = json_format.ParseDict(value, Value())
            if not _parameter_type_ok(kind, proto):
                problems.append(
                    f"run argument {name}={value!r} is not a {declared[name]['parameterType']}"
                )
    for name in required_run_parameters(spec):
        if name not in arguments:
            problems.append(f"required run parameter {name!r} has no value")
    return problems


def _check_platform(
    spec, platform: dict | None, placement: ExpectedPlacement, problems: list
) -> None:
    """Strict parsing of every executor's Kubernetes settings, and placement on exactly the
    right executors."""
    from kfp.kubernetes.kubernetes_executor_config_pb2 import KubernetesExecutorConfig
    from kfp.pipeline_spec.pipeline_spec_pb2 import PlatformSpec

    executors_k8s = {}
    if platform is not None:
        parsed = _parse(PlatformSpec(), platform, "platform document", problems)
        if parsed is not None:
            k8s = platform.get("platforms", {}).get("kubernetes", {})
            executors_k8s = k8s.get("deploymentSpec", {}).get("executors", {})
    configs = {}
    for executor, data in executors_k8s.items():
        config = _parse(
            KubernetesExecutorConfig(), data, f"executor {executor} (kubernetes)", problems
        )
        if config is not None:
            configs[executor] = config
    deployment = _deployment_executors(spec, [])
    component_of = {
        c.executor_label: _base_component(name)
        for name, c in spec.components.items()
        if c.WhichOneof("implementation") == "executor_label"
    }
    for executor in executors_k8s:
        if executor not in deployment:
            problems.append(f"platform settings for executor {executor!r}, which does not exist")
    for executor, container_spec in deployment.items():
        component = component_of.get(executor, executor)
        config = configs.get(executor, KubernetesExecutorConfig())
        gpu = component in placement.gpu_components
        accelerator = container_spec.container.resources.accelerator
        if gpu:
            count = accelerator.resource_count
            if not accelerator.resource_type or not count or (count.isdigit() and int(count) < 1):
                problems.append(f"executor {executor} ({component}): GPU step without a GPU limit")
            labels = dict(config.node_selector.labels)
            if not labels or (
                placement.gpu_node_selector and labels != placement.gpu_node_selector
            ):
                problems.append(
                    f"executor {executor} ({component}): node selector {labels}, expected "
                    f"{placement.gpu_node_selector}"
                )
            if not config.tolerations:
                problems.append(f"executor {executor} ({component}): GPU step without a toleration")
        else:
            if accelerator.resource_type or config.node_selector.labels or config.tolerations:
                problems.append(
                    f"executor {executor} ({component}): a CPU step asks for a GPU, a node "
                    "selector or a toleration"
                )
        context = config.security_context
        if placement.run_as_user is not None and (
            not context.run_as_non_root or context.run_as_user != placement.run_as_user
        ):
            problems.append(
                f"executor {executor} ({component}): does not run as the images' non-root user "
                f"{placement.run_as_user} (securityContext runAsUser, runAsNonRoot)"
            )
        _check_pvc_mounts(executor, component, gpu, config, placement, problems)
        secrets = {s.secret_name for s in config.secret_as_env}
        if component in placement.storage_components:
            if placement.secret_name not in secrets:
                problems.append(
                    f"executor {executor} ({component}): reads object storage but does not get "
                    f"the secret {placement.secret_name!r} as environment"
                )
        elif secrets:
            problems.append(
                f"executor {executor} ({component}): gets secrets {sorted(secrets)} it does not need"
            )


def _check_pvc_mounts(executor, component, gpu, config, placement, problems) -> None:
    """The compilation cache's claim on exactly the GPU executors, and no other claim anywhere."""
    claims = sorted(
        m.constant or m.pvc_name_parameter.runtime_value.constant.string_value or "?"
        for m in config.pvc_mount
    )
    expected = [placement.gpu_pvc] if gpu and placement.gpu_pvc else []
    if claims != expected:
        problems.append(
            f"executor {executor} ({component}): mounts claims {claims}, expected {expected}"
        )


def check_pipeline(
    source: str | Path,
    placement: ExpectedPlacement | None = None,
    run_parameter_types: dict | None = None,
) -> list[str]:
    """Every problem a KFP backend (and our stricter reading of the platform settings) finds."""
    from kfp.pipeline_spec.pipeline_spec_pb2 import PipelineSpec

    spec_data, platform = load_documents(source)
    problems: list[str] = []
    spec = _parse(PipelineSpec(), spec_data, "PipelineSpec", problems)
    if spec is None:
        return problems
    if spec.schema_version != SCHEMA_VERSION:
        problems.append(
            f"schemaVersion {spec.schema_version!r}: a KFP 2 backend expects {SCHEMA_VERSION!r}"
        )
    if not spec.pipeline_info.name:
        problems.append("pipelineInfo has no name")
    _check_component_graph(spec, problems)
    _check_run_parameters(spec, run_parameter_types or {}, problems)
    if placement is not None:
        _check_platform(spec, platform, placement, problems)
    return problems
