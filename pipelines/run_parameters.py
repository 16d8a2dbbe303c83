"""The run parameters: what a user may change per run without compiling again, declared once.

Each :class:`RunParameter` below is the single place a parameter is named, typed, described and
given its default (from the configuration the pipeline is compiled with). From this list come:

- the pipeline function's signature and its docstring's ``Args:`` (so the KFP UI shows every
  parameter with its description and default);
- the ``resolve-config`` component, the pipeline's first step, which overlays the parameters on the
  compiled configuration, validates the result and returns the list of folds the run trains;
- the README's and the CLI's parameter lists (a test checks the README against this list).

A KFP lightweight component is shipped as the source text of its function, so the resolve
component's function is generated from the list (its source is registered with ``linecache`` so
that ``inspect.getsource`` and tracebacks see it like any other function's).
"""

from __future__ import annotations

import inspect
import linecache
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, List  # noqa: UP035 - KFP reads typing.List annotations

from dfu_ml.config import Config, config_from_json, parse_override
from dfu_ml.errors import ConfigError

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class RunParameter:
    """One run parameter.

    ``default`` maps the compiled configuration (and the runtime settings) to the default value;
    ``config_key`` is the Config field the value overrides (None for parameters that steps take
    directly or that resolve maps on its own, such as ``use_metadata``).
    """

    name: str
    annotation: Any
    help: str
    default: Callable[[Config, Any], Any] | None = None
    config_key: str | None = None
    resolved: bool = True  # False: passed straight to the steps that use it, not to resolve

    def default_for(self, config: Config, runtime) -> Any:
        return REQUIRED if self.default is None else self.default(config, runtime)


def _config(key: str) -> Callable[[Config, Any], Any]:
    return lambda config, _runtime: getattr(config, key)


# Every run parameter of the main pipeline, in the order the KFP UI lists them.
MAIN_RUN_PARAMETERS = (
    RunParameter(
        "data",
        str,
        "Dataset in the study's layout: s3://bucket/prefix (or a folder where the steps run).",
        resolved=False,
    ),
    RunParameter(
        "models_uri",
        str,
        "Where a blessed model is published (s3://bucket/prefix); empty: publish nothing.",
        default=lambda _config, runtime: runtime.models_uri,
        resolved=False,
    ),
    RunParameter(
        "image_modalities",
        List[str],
        "Image modalities to fuse (depth_rgb, depth_map, thermal_rgb, thermal_map).",
        default=lambda config, _runtime: list(config.image_modalities),
    ),
    RunParameter(
        "use_metadata",
        bool,
        "Fuse the clinical random forest's probabilities with the images.",
        default=lambda config, _runtime: config.uses_metadata,
    ),
    RunParameter(
        "cv_folds",
        int,
        "Number of patient-grouped cross-validation folds.",
        _config("cv_folds"),
        "cv_folds",
    ),
    RunParameter(
        "folds",
        List[int],
        "Which folds to train, e.g. [0]; empty (the default): every fold 0..cv_folds-1.",
        default=lambda _config, _runtime: [],
    ),
    RunParameter(
        "data_percentage",
        float,
        "Percentage of patients to use (sampled per class, never rows).",
        _config("data_percentage"),
        "data_percentage",
    ),
    RunParameter(
        "image_size",
        int,
        "Side of the square wound crops, in pixels.",
        _config("image_size"),
        "image_size",
    ),
    RunParameter(
        "backbone",
        str,
        "Image backbone (DenseNet121, EfficientNetB0, ..., small_cnn).",
        _config("backbone"),
        "backbone",
    ),
    RunParameter(
        "pretrain_epochs",
        int,
        "Maximum image pre-training epochs (early stopping on kappa).",
        _config("pretrain_epochs"),
        "pretrain_epochs",
    ),
    RunParameter(
        "stage1_epochs", int, "Maximum Stage 1 epochs.", _config("stage1_epochs"), "stage1_epochs"
    ),
    RunParameter(
        "stage2_epochs", int, "Maximum Stage 2 epochs.", _config("stage2_epochs"), "stage2_epochs"
    ),
    RunParameter(
        "pretrain_lr",
        float,
        "Image pre-training learning rate.",
        _config("pretrain_lr"),
        "pretrain_lr",
    ),
    RunParameter("stage1_lr", float, "Stage 1 learning rate.", _config("stage1_lr"), "stage1_lr"),
    RunParameter(
        "stage2_lr",
        float,
        "Stage 2 learning rate (RC4: 1e-6 moved nothing).",
        _config("stage2_lr"),
        "stage2_lr",
    ),
    RunParameter(
        "alpha_max_ratio",
        float,
        "Cap on the focal-loss alphas' max/min ratio (RC2).",
        _config("alpha_max_ratio"),
        "alpha_max_ratio",
    ),
    RunParameter("seed", int, "Random seed (folds, resampling, weights).", _config("seed"), "seed"),
    RunParameter(
        "config_overrides",
        List[str],
        'Any other config keys as "key=value" strings, e.g. ["dropout=0.2"].',
        default=lambda _config, _runtime: [],
    ),
)


def overrides_from_parameters(values: dict) -> dict:
    """Config overrides from resolved run-parameter values (``folds`` excluded)."""
    by_name = {p.name: p for p in MAIN_RUN_PARAMETERS}
    overrides = {}
    for name, value in values.items():
        parameter = by_name.get(name)
        if parameter is not None and parameter.config_key:
            overrides[parameter.config_key] = value
    if "image_modalities" in values or "use_metadata" in values:
        overrides["modalities"] = (["metadata"] if values.get("use_metadata") else []) + list(
            values.get("image_modalities") or []
        )
    for text in values.get("config_overrides") or []:
        key, value = parse_override(str(text))
        overrides[key] = value
    return overrides


def resolve_run(
    config_json: str, values: dict, config_path: str | None = None, same_modalities: bool = False
) -> list[int]:
    """Overlay run parameters on the compiled configuration; write it; return the folds to train.

    A metadata-only configuration and an image configuration compile to different DAGs, so a run
    may not switch between them; with ``same_modalities`` (a DAG unrolled over the compiled
    modalities) it may not change them at all.
    """
    base = config_from_json(config_json)
    resolved = base.replace(**overrides_from_parameters(values))
    if same_modalities and resolved.modalities != base.modalities:
        raise ConfigError(
            f"modalities {resolved.modalities}: this pipeline was compiled for "
            f"{base.modalities} and trains exactly those; compile again with --set modalities=..."
        )
    if bool(resolved.image_modalities) != bool(base.image_modalities):
        raise ConfigError(
            f"modalities {resolved.modalities}: this pipeline was compiled for "
            f"{base.modalities}; a metadata-only run and an image run are different DAGs, so "
            "compile again with --set modalities=..."
        )
    folds = [int(f) for f in values.get("folds") or []] or list(range(resolved.cv_folds))
    outside = [f for f in folds if not 0 <= f < resolved.cv_folds]
    if outside or len(set(folds)) != len(folds):
        raise ConfigError(
            f"run parameter 'folds' {folds}: each fold must be in 0..{resolved.cv_folds - 1} "
            f"(cv_folds={resolved.cv_folds}) and appear once; leave it empty for every fold"
        )
    if config_path is not None:
        with open(config_path, "w") as handle:
            handle.write(resolved.to_json())
    return folds


def kfp_type(annotation) -> str:
    """The PipelineSpec parameter type a Python annotation compiles to."""
    if getattr(annotation, "__origin__", None) is list:
        return "LIST"
    return {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING", bool: "BOOLEAN"}[
        annotation
    ]


def _type_name(annotation) -> str:
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(annotation) or str(
        annotation
    ).replace("typing.", "")


class RunParameters:
    """A pipeline's run parameters: the signature and resolve component they generate."""

    def __init__(self, parameters: tuple[RunParameter, ...], resolver: str):
        self.parameters = parameters
        # "module:function" that the generated resolve component calls with the values.
        self.resolver = resolver

    @property
    def resolved(self) -> tuple[RunParameter, ...]:
        return tuple(p for p in self.parameters if p.resolved)

    def signature(self, config: Config, runtime, defaults: dict | None = None) -> inspect.Signature:
        """The pipeline function's signature: required parameters first, then the defaults.

        ``defaults`` gives compile-time defaults of parameters that neither the configuration nor
        the runtime settings define (a search's combinations)."""
        defaults = defaults or {}
        params = [
            inspect.Parameter(
                p.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=defaults[p.name] if p.name in defaults else p.default_for(config, runtime),
                annotation=p.annotation,
            )
            for p in self.parameters
        ]
        params.sort(key=lambda p: p.default is not REQUIRED)
        return inspect.Signature(params)

    def kfp_types(self) -> dict[str, str]:
        """Each run parameter's PipelineSpec type (what the acceptance check expects)."""
        return {p.name: kfp_type(p.annotation) for p in self.parameters}

    def args_doc(self) -> str:
        return "\n".join(f"    {p.name}: {p.help}" for p in self.parameters)

    def pipeline_function(
        self, body: Callable, name: str, doc: str, config: Config, runtime, defaults=None
    ):
        """A function KFP can compile: the generated signature, ``doc`` + ``Args:``, and a body
        that receives every run parameter by name."""
        signature = self.signature(config, runtime, defaults)
        names = list(signature.parameters)

        def pipeline_func(*args, **kwargs):
            return body(**dict(zip(names, args)), **kwargs)

        pipeline_func.__signature__ = signature
        pipeline_func.__annotations__ = {p.name: p.annotation for p in self.parameters}
        pipeline_func.__name__ = pipeline_func.__qualname__ = name.replace("-", "_")
        pipeline_func.__doc__ = f"{doc.strip()}\n\nArgs:\n{self.args_doc()}\n"
        return pipeline_func

    def resolve_function(self) -> Callable:
        """Generate ``resolve_config(config_json, code_version, <run parameters>, config)``."""
        module, function = self.resolver.split(":")
        arguments = ", ".join(f"{p.name}: {_type_name(p.annotation)}" for p in self.resolved)
        values = ", ".join(f"{p.name}={p.name}" for p in self.resolved)
        args_doc = "".join(f"        {p.name}: {p.help}\n" for p in self.resolved)
        source = (
            f"def resolve_config(config_json: str, code_version: str, {arguments}, "
            "config: Output[Dataset]) -> List[int]:\n"
            '    """Overlay the run parameters on the compiled configuration, validate it and\n'
            "    return the folds to train.\n\n"
            "    ``code_version`` is not read: it keys KFP's cache, so that results computed by\n"
            "    other code are never reused (every step depends on this step's output).\n\n"
            "    Args:\n"
            "        config_json: the configuration the pipeline was compiled with.\n"
            "        code_version: the package version and a digest of its sources.\n"
            f"{args_doc}"
            "        config: the resolved configuration (config.json).\n"
            '    """\n'
            f"    from {module} import {function}\n\n"
            f"    return {function}(config_json, dict({values}), config.path)\n"
        )
        filename = f"<dfu-kfp generated {self.resolver}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        from kfp.dsl import Dataset, Output

        namespace = {"Output": Output, "Dataset": Dataset, "List": List}
        exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # noqa: S102 - our own generated source
        return namespace["resolve_config"]


def resolve_diagnose_run(config_json: str, values: dict, config_path: str | None = None):
    """:func:`resolve_run` for the diagnose pipeline, whose DAG is unrolled over the compiled
    image modalities."""
    return resolve_run(config_json, values, config_path, same_modalities=True)


MAIN = RunParameters(MAIN_RUN_PARAMETERS, "pipelines.run_parameters:resolve_run")

# The diagnose pipeline's: the main ones but publishing and the modalities (its loops are
# unrolled over the compiled ones), and two folds by default, enough to pair the differences.
DIAGNOSE_FOLDS = [0, 1]
DIAGNOSE = RunParameters(
    tuple(
        RunParameter(
            "folds",
            List[int],
            "Which folds to train for every variant; default [0, 1], the first two (enough to "
            "pair the differences); empty: every fold 0..cv_folds-1.",
            default=lambda _config, _runtime: list(DIAGNOSE_FOLDS),
        )
        if p.name == "folds"
        else p
        for p in MAIN_RUN_PARAMETERS
        if p.name not in ("models_uri", "image_modalities", "use_metadata")
    ),
    "pipelines.run_parameters:resolve_diagnose_run",
)
DIAGNOSE_PIPELINE_NAME = "dfu-kfp-diagnose"


# The modality-combination search (pipelines/search.py): what it compares and publishes, then the
# main pipeline's training parameters (modalities come from the combinations, and every fold is
# trained: the nested choice needs them all).
SEARCH_PIPELINE_NAME = "dfu-kfp-search"
SEARCH_SETTINGS = ("combinations", "final_model", "bootstrap_replicates")
SEARCH_RUN_PARAMETERS = (
    *(p for p in MAIN_RUN_PARAMETERS if p.name in ("data", "models_uri")),
    RunParameter(
        "combinations",
        List[str],
        'Modality combinations to compare, e.g. ["metadata+depth_rgb", "depth_rgb"]; '
        "metadata-only (the baseline) is always among them.",
    ),
    RunParameter(
        "final_model",
        str,
        "What publish pushes: ensemble (every combination averaged), best, or one combination.",
    ),
    RunParameter(
        "bootstrap_replicates",
        int,
        "Patient-bootstrap replicates per paired difference to metadata-only (0: no intervals).",
    ),
    *(
        p
        for p in MAIN_RUN_PARAMETERS
        if p.name not in ("data", "models_uri", "image_modalities", "use_metadata", "folds")
    ),
)


def resolve_search(config_json: str, values: dict, config_path: str | None = None) -> list[int]:
    """The search's first step: validate what it compares, overlay the run parameters, write the
    configuration (every modality a combination uses) and return every fold.

    A search whose combinations are all metadata-only and one with images are different DAGs.
    """
    from dfu_ml.search import SearchSettings, search_config

    settings = SearchSettings.from_values(
        values["combinations"], values["final_model"], values["bootstrap_replicates"]
    )
    base = config_from_json(config_json)
    training = {k: v for k, v in values.items() if k not in SEARCH_SETTINGS}
    resolved = search_config(
        base.replace(**overrides_from_parameters(training)), settings.combinations
    )
    if bool(resolved.image_modalities) != bool(base.image_modalities):
        raise ConfigError(
            f"combinations {list(settings.combinations)}: this search was compiled for "
            f"{base.modalities}; a search without image combinations and one with them are "
            "different DAGs, so compile again with those combinations"
        )
    if config_path is not None:
        with open(config_path, "w") as handle:
            handle.write(resolved.to_json())
    return list(range(resolved.cv_folds))


SEARCH = RunParameters(SEARCH_RUN_PARAMETERS, "pipelines.run_parameters:resolve_search")


def for_pipeline(name: str) -> RunParameters:
    """The run parameters of the pipeline called ``name`` (as compiled)."""
    return {"dfu-kfp": MAIN, DIAGNOSE_PIPELINE_NAME: DIAGNOSE, SEARCH_PIPELINE_NAME: SEARCH}.get(
        name, MAIN
    )


def parameter_table(parameters: RunParameters = MAIN) -> list[tuple[str, str, str]]:
    """(name, type, description) rows, for the README and ``dfu-kfp compile --help``."""
    return [(p.name, _type_name(p.annotation), p.help) for p in parameters.parameters]
