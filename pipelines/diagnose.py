"""The diagnose DAG: the study's root-cause analysis replayed on a dataset (``dfu-kfp diagnose``).

It trains the same patient folds under every variant of ``dfu_ml.diagnose`` (pre-fix, fixed,
fixed minus RC_k) in parallel and reports, per root cause, what its fix is worth. What every
variant shares is made once: the prepared data, each fold's plan and clinical forest, and each
distinct pre-training (most variants differ only in Stage 1 and Stage 2, so they reuse the fixed
configuration's encoders; ``dfu_ml.diagnose.pretrain_group``).

Per fold (``ParallelFor`` over the folds), every variant is one task: a ``ParallelFor`` over the
variants that run their own pre-training (pre-fix, fixed, minus-RC1, minus-RC6: pre-training,
Stage 1, Stage 2), a pool of their outputs, then a ``ParallelFor`` over the variants that reuse
one of those pre-trainings (Stage 1, Stage 2), and a pool of theirs. Then one report. A variant's
pre-training runs in its own task, not in per-modality tasks as in the main pipeline: on 2 CPU
cores every task's TensorFlow start-up (about 7 s of CPU) would cost more than the modalities'
parallelism gains on a GPU node.

kfp.local (2.17) and compiler constraints this DAG respects (besides ``pipeline.py``'s): a loop's
``dsl.Collected`` outputs cannot be an input of a task inside another loop, so a pool step gathers
them into one artifact first; and ``dsl.Collected`` of a loop nested in another arrives locally as
a list of lists, which a step cannot take, so each fold pools its variants' results and the report
collects one pool per fold. The loops' items are lists fixed at compile time, so the image
modalities are compiled in (not a run parameter, unlike the main pipeline).
"""

from pathlib import Path
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset

from components.clinical_rf import clinical_forest
from components.common import code_version
from components.diagnose import diagnose_report, diagnose_variant, pool_artifacts
from components.prepare import prepare_data
from components.resample_alpha import make_fold_plan
from dfu_ml.config import Config
from dfu_ml.diagnose import VARIANTS, check_diagnosable, pretrain_group
from pipelines import pipeline
from pipelines.acceptance import ExpectedPlacement
from pipelines.pipeline import Placement, component, plan_and_forest, resolve_and_prepare
from pipelines.run_parameters import DIAGNOSE, DIAGNOSE_FOLDS, DIAGNOSE_PIPELINE_NAME
from pipelines.settings import RuntimeSettings

PIPELINE_NAME = DIAGNOSE_PIPELINE_NAME
GPU_COMPONENTS = frozenset({"diagnose-variant"})
STORAGE_COMPONENTS = frozenset({"prepare-data"})

DESCRIPTION = """DFU healing-phase classifier, diagnose: the study's root-cause analysis (RC1..RC6)
replayed on a dataset. The same patient folds train under every variant: pre-fix (every fix
reverted), fixed (the configuration as compiled) and fixed minus RC_k (one fix reverted), each
from the config overlays in dfu_ml/profiles/diagnose/. The report gives, per variant, the final
quadratic kappa (mean +/- std over folds) and the symptoms the analysis names, and per root cause
the paired kappa cost of reverting its fix and the health checks it trips.

Stages:
1. resolve run configuration, prepare data (shared by every variant).
2. per fold: split, resample, focal alpha and the clinical random forest (shared).
3. per fold, each variant with a pre-training of its own (GPU): pre-train the image encoders,
   Stage 1, Stage 2.
4. per fold, each variant that shares one of those pre-trainings (GPU): Stage 1, Stage 2.
5. diagnose report: diagnose.json, the HTML report, Markdown and the kappa plot."""


class Outputs(NamedTuple):
    """What the pipeline returns (the local runner reads it, as the KFP UI shows it)."""

    diagnosis: Dataset


def expected_placement(runtime: RuntimeSettings | None = None) -> ExpectedPlacement:
    return pipeline.expected_placement(runtime, GPU_COMPONENTS, STORAGE_COMPONENTS)


class DiagnoseSteps:
    """The diagnose pipeline's components, bound to their images (CPU or GPU)."""

    def __init__(self, images: dict, local: bool = False):
        cpu, gpu = images["cpu"], images["gpu"]
        self.resolve = component(DIAGNOSE.resolve_function(), cpu, local)
        self.prepare = component(prepare_data, cpu, local)
        self.plan = component(make_fold_plan, cpu, local)
        self.forest = component(clinical_forest, cpu, local)
        self.variant = component(diagnose_variant, gpu, local)
        self.pool = component(pool_artifacts, cpu, local)
        self.report = component(diagnose_report, cpu, local)


# Variants that run their own pre-training, and those that reuse one of theirs.
PRETRAINING = [v for v in VARIANTS if pretrain_group(v) == v]
REUSING = [v for v in VARIANTS if pretrain_group(v) != v]


def build_diagnose_pipeline(
    config: Config, runtime: RuntimeSettings | None = None, local: bool = False
):
    """Return the diagnose pipeline function for ``config`` (the fixed variant's configuration;
    its values become the run parameters' defaults). ``local`` as in ``build_pipeline``."""
    check_diagnosable(config)
    runtime = runtime or RuntimeSettings()
    steps, place = DiagnoseSteps(runtime.images, local), Placement(runtime, local)
    config_json, version = config.to_json(), code_version()

    def body(data, **values) -> Outputs:
        resolve, prepare = resolve_and_prepare(
            steps, place, DIAGNOSE, config_json, version, {**values, "data": data}
        )
        settings, dataset = resolve.outputs["config"], prepare.outputs["prepared"]
        with dsl.ParallelFor(resolve.outputs["Output"], name="cross-validation folds") as fold:
            plan, forest = plan_and_forest(steps, "fold", dataset, fold, settings)
            shared = {
                "prepared": dataset,
                "fold_plan": plan.outputs["fold_plan"],
                "rf": forest.outputs["rf"],
                "config": settings,
            }
            with dsl.ParallelFor(PRETRAINING, name="fold · variants that pre-train") as variant:
                own = place.gpu(steps.variant(variant=variant, **shared))
                own.set_display_name("fold · variant · pre-train, Stage 1, Stage 2")
            pretrained = steps.pool(items=dsl.Collected(own.outputs["trained"]))
            pretrained.set_display_name("fold · pool the pre-trained variants")
            with dsl.ParallelFor(REUSING, name="fold · variants that reuse one") as variant:
                reuse = place.gpu(
                    steps.variant(variant=variant, pretrained=pretrained.outputs["pool"], **shared)
                )
                reuse.set_display_name("fold · variant · Stage 1, Stage 2")
            reusing = steps.pool(items=dsl.Collected(reuse.outputs["trained"]))
            reusing.set_display_name("fold · pool the reusing variants")
        report = steps.report(
            pretrained_pools=dsl.Collected(pretrained.outputs["pool"]),
            reusing_pools=dsl.Collected(reusing.outputs["pool"]),
            config=settings,
        )
        report.set_display_name("diagnose report · root causes")
        return Outputs(diagnosis=report.outputs["summary"])

    function = DIAGNOSE.pipeline_function(body, PIPELINE_NAME, DESCRIPTION, config, runtime)
    function.__signature__ = function.__signature__.replace(return_annotation=Outputs)
    return dsl.pipeline(name=PIPELINE_NAME, display_name="dfu-kfp: diagnose root causes")(function)


def compile_diagnose(config: Config, output: Path, runtime: RuntimeSettings | None = None) -> Path:
    from pipelines.pipeline import compile_pipeline

    return compile_pipeline(config, output, runtime, build=build_diagnose_pipeline)


def run_diagnose_local(
    config: Config,
    data: str | None,
    out: Path,
    folds: list[int] | None = None,
    log=print,
    quiet: bool = True,
    runner: str = "subprocess",
    runtime: RuntimeSettings | None = None,
    synth_patients: int | None = None,
) -> dict:
    """``dfu-kfp diagnose``: the diagnose pipeline through kfp.local (``local_run.execute``, as the
    main job), its report collected into ``out``; prints the tables and the root-cause lines and
    returns the diagnosis. ``folds`` defaults to the run parameter's default (the first two)."""
    from dfu_ml.diagnose_report import FILES, format_report
    from pipelines.local_run import DEFAULT_SYNTH_PATIENTS, execute

    check_diagnosable(config)
    folds = list(DIAGNOSE_FOLDS if folds is None else folds)
    diagnosis = execute(
        lambda runtime: build_diagnose_pipeline(config, runtime, local=True),
        _collect,
        out,
        data,
        seed=config.seed,
        synth_patients=synth_patients or DEFAULT_SYNTH_PATIENTS,
        describe=f", modalities {config.modalities}, folds {folds} of {config.cv_folds}, "
        f"{len(VARIANTS)} variants, profile {config.profile}",
        summary_file=FILES["json"],
        log=log,
        quiet=quiet,
        runner=runner,
        runtime=runtime,
        arguments={"folds": folds},
    )
    out = Path(out).resolve()
    log("")
    log(format_report(diagnosis))
    log(
        f"report: {out / FILES['html']}  diagnosis: {out / FILES['json']}  "
        f"({diagnosis['seconds']} s)"
    )
    return diagnosis


def _collect(outputs: dict, staging: Path, run) -> dict:
    """The report's files from the pipeline's returned artifact, and the diagnosis."""
    import json
    import shutil

    from dfu_ml.diagnose_report import FILES, PLOT_FILE

    folder = Path(outputs["diagnosis"].path)
    for name in (FILES["html"], FILES["md"], PLOT_FILE):
        shutil.copyfile(folder / name, staging / name)
    diagnosis = json.loads((folder / FILES["json"]).read_text())
    diagnosis["files"] = {k: str(run.out / Path(v).name) for k, v in diagnosis["files"].items()}
    diagnosis.update(
        {"run_id": run.run_id, "data": run.data, "pipeline_run": str(folder.parents[1])}
    )
    return diagnosis
