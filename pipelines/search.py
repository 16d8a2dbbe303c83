"""The modality-combination search DAG: which modalities help, with honest uncertainty.

One definition, run by ``kfp.local`` (``dfu-kfp search``) or compiled for a cluster
(``dfu-kfp compile --pipeline search``). Its run parameters are declared with the main
pipeline's, in ``pipelines/run_parameters.py`` (``SEARCH``).

Every combination trains on the same patient folds (``dfu_ml/search/folds.py``): per fold the
patients are split once, the clinical random forest is fitted once, each image modality's encoder
is pre-trained once and reused by every combination that contains it, and Stage 1 + Stage 2 run
per combination in parallel on the GPU pool. A search whose combinations are all metadata-only
compiles without the image steps.

kfp.local (2.17) quirks this DAG respects, besides the main pipeline's (``pipelines/pipeline.py``):

- a ParallelFor nested in the fold loop iterates over a list that a task of the same fold
  returns (a task's list from outside the fold loop resolves to the fold number there), and a
  loop's list must be a task's single return value (kfp.local finds no named NamedTuple output);
- a loop's collected outputs cannot feed the tasks of a sibling loop (it does not compile), so the
  fold's encoders are gathered into one artifact first;
- collecting over two nested loops does not flatten, so each fold's results are gathered first;
- an empty loop fails, so the final fit runs every view, and a step whose view the final model
  does not use returns at once, marked skipped.
"""

from pathlib import Path

from kfp import dsl

from components.clinical_rf import clinical_forest
from components.common import code_version
from components.prepare import prepare_data
from components.publish import publish_model
from components.search import (
    bundle_search,
    evaluate_search,
    fuse_combination,
    gather_encoders,
    gather_fold_results,
    pretrain_shared_encoder,
    split_search_fold,
)
from dfu_ml.config import Config
from dfu_ml.search import SearchSettings, search_config
from dfu_ml.training.fold import FINAL_FIT
from pipelines.acceptance import ExpectedPlacement
from pipelines import pipeline
from pipelines.pipeline import Outputs, Placement, bundle_and_publish, component
from pipelines.run_parameters import SEARCH, SEARCH_PIPELINE_NAME
from pipelines.settings import RuntimeSettings

PIPELINE_NAME = SEARCH_PIPELINE_NAME

DESCRIPTION = """DFU modality-combination search: which modalities help. Every combination is
trained on the same patient folds and compared with paired, patient-bootstrapped differences to
metadata-only, a late-fusion ensemble and a nested choice of the best combination.

Stages (per cross-validation fold, then once more on all patients as the final fit):
1. resolve search configuration: the combinations and run parameters over the compiled ones.
2. prepare data: crop every image modality any combination uses.
3. split patients once for every combination: each view's rows planned from one split.
4. clinical random forest (once per fold): also the metadata-only combination.
5. pre-train image encoder (once per modality and fold, GPU), shared by every combination.
6. Stage 1 + Stage 2 of each image combination (GPU, in parallel over combinations).
7. compare combinations: mean +/- std per row and per visit, paired differences to metadata-only
   with bootstrap intervals, the ensemble, the nested choice, the final model and its blessing.
8. final fit on all patients (only what the final model uses), bundle the final model.
9. publish the blessed model to models_uri (never overwriting a published model id)."""

GPU_COMPONENTS = frozenset({"pretrain-shared-encoder", "fuse-combination"})
STORAGE_COMPONENTS = frozenset({"prepare-data", "publish-model"})


def expected_placement(runtime: RuntimeSettings | None = None) -> ExpectedPlacement:
    return pipeline.expected_placement(runtime, GPU_COMPONENTS, STORAGE_COMPONENTS)


class SearchSteps:
    """The search's components, bound to their images (CPU or GPU)."""

    def __init__(self, images: dict, local: bool = False):
        cpu, gpu = images["cpu"], images["gpu"]
        self.resolve = component(SEARCH.resolve_function(), cpu, local)
        self.prepare = component(prepare_data, cpu, local)
        self.split = component(split_search_fold, cpu, local)
        self.forest = component(clinical_forest, cpu, local)
        self.pretrain = component(pretrain_shared_encoder, gpu, local)
        self.gather_encoders = component(gather_encoders, cpu, local)
        self.fuse = component(fuse_combination, gpu, local)
        self.gather_results = component(gather_fold_results, cpu, local)
        self.evaluate = component(evaluate_search, cpu, local)
        self.bundle = component(bundle_search, cpu, local)
        self.publish = component(publish_model, cpu, local)


def search_fold(
    steps: SearchSteps,
    place: Placement,
    label: str,
    prepared,
    fold,
    settings,
    combinations,
    image_search: bool,
    final_fit=None,
):
    """One fold of the search (``label`` names its tasks: "fold" or "final fit").

    ``final_fit`` (the search summary) fixes each step's epochs and which views are trained.
    Returns the split, forest and (image searches) fusion tasks.
    """
    fixed = {} if final_fit is None else {"final_fit": final_fit}
    split = steps.split(prepared=prepared, fold=fold, config=settings, combinations=combinations)
    split.set_display_name(f"{label} · split patients once for every combination")
    shared = split.outputs["split"]
    forest = steps.forest(
        prepared=prepared,
        fold_plan=shared,
        config=split.outputs["clinical_config"],
        # Fused combinations train on its training-visit probabilities: out-of-fold ones.
        for_fusion=image_search,
    )
    forest.set_display_name(f"{label} · clinical random forest (metadata-only)")
    if not image_search:
        return split, forest, None
    with dsl.ParallelFor(split.outputs["Output"], name=f"{label} · image modalities") as modality:
        encoder = place.gpu(
            steps.pretrain(
                prepared=prepared, split=shared, modality=modality, config=settings, **fixed
            )
        )
        encoder.set_display_name(f"{label} · pre-train image encoder (shared)")
    encoders = steps.gather_encoders(
        encoders=dsl.Collected(encoder.outputs["encoder"]), combinations=combinations
    )
    encoders.set_display_name(f"{label} · gather the shared encoders")
    with dsl.ParallelFor(
        encoders.outputs["Output"], name=f"{label} · image combinations"
    ) as combination:
        fused = place.gpu(
            steps.fuse(
                prepared=prepared,
                split=shared,
                combination=combination,
                rf=forest.outputs["rf"],
                encoders=encoders.outputs["fold_encoders"],
                config=settings,
                **fixed,
            )
        )
        fused.set_display_name(f"{label} · Stage 1 + Stage 2 of a combination")
    return split, forest, fused


def build_search_pipeline(
    config: Config,
    settings: SearchSettings,
    runtime: RuntimeSettings | None = None,
    local: bool = False,
):
    """Return the search pipeline function for ``settings`` (the compiled defaults of the
    combinations, final model and bootstrap) over ``config``'s training settings.

    ``local`` leaves out what kfp.local cannot honour (secrets, GPU placement); the DAG is the same.
    """
    runtime = runtime or RuntimeSettings()
    steps, place = SearchSteps(runtime.images, local), Placement(runtime, local)
    config = search_config(config, settings.combinations)
    config_json, version = config.to_json(), code_version()
    image_search = bool(settings.image_combinations)
    defaults = {
        "combinations": list(settings.combinations),
        "final_model": settings.final_model,
        "bootstrap_replicates": settings.bootstrap,
    }

    def body(data, models_uri, **values) -> Outputs:
        resolve = steps.resolve(
            config_json=config_json,
            code_version=version,
            **{p.name: values[p.name] for p in SEARCH.resolved},
        )
        resolve.set_display_name("resolve search configuration")
        search = resolve.outputs["config"]
        combinations = values["combinations"]
        prepare = place.storage(steps.prepare(data=data, config=search))
        prepare.set_display_name("prepare data")
        dataset = prepare.outputs["prepared"]
        with dsl.ParallelFor(resolve.outputs["Output"], name="cross-validation folds") as fold:
            split, forest, fused = search_fold(
                steps, place, "fold", dataset, fold, search, combinations, image_search
            )
            gathered = steps.gather_results(
                split=split.outputs["split"],
                rf=forest.outputs["rf"],
                **({"fused": dsl.Collected(fused.outputs["model"])} if image_search else {}),
            )
            gathered.set_display_name("fold · gather every combination's results")
        evaluation = steps.evaluate(
            fold_results=dsl.Collected(gathered.outputs["fold_results"]),
            config=search,
            combinations=combinations,
            final_model=values["final_model"],
            bootstrap_replicates=values["bootstrap_replicates"],
        )
        evaluation.set_display_name("compare combinations · ensemble · nested choice")
        summary = evaluation.outputs["summary"]
        _, final_forest, final_fused = search_fold(
            steps,
            place,
            "final fit",
            dataset,
            FINAL_FIT,
            search,
            combinations,
            image_search,
            final_fit=summary,
        )
        final_model = bundle_and_publish(
            steps,
            place,
            evaluation,
            models_uri,
            rf=final_forest.outputs["rf"],
            summary=summary,
            config=search,
            data=data,
            data_digest=prepare.outputs["Output"],
            code_version=version,
            **({"fused": dsl.Collected(final_fused.outputs["model"])} if image_search else {}),
        )
        return Outputs(summary=summary, final_model=final_model)

    function = SEARCH.pipeline_function(body, PIPELINE_NAME, DESCRIPTION, config, runtime, defaults)
    function.__signature__ = function.__signature__.replace(return_annotation=Outputs)
    return dsl.pipeline(name=PIPELINE_NAME, display_name="dfu-kfp: modality-combination search")(
        function
    )


def compile_search_pipeline(
    config: Config, settings: SearchSettings, output: Path, runtime: RuntimeSettings | None = None
) -> Path:
    from kfp import compiler

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_search_pipeline(config, settings, runtime), str(output))
    return Path(output)


# --- the local search (dfu-kfp search) ------------------------------------------------------------
SEARCH_RESULT_FILES = ("search.html", "search.md", "search.png")  # the report first


def run_search_local(
    config: Config,
    settings: SearchSettings,
    data: str | None,
    out: Path,
    synth_patients: int | None = None,
    log=print,
    quiet: bool = True,
    runner: str = "subprocess",
    runtime: RuntimeSettings | None = None,
) -> dict:
    """The search through kfp.local, its results collected into ``out`` (see
    :func:`pipelines.local_run.execute`); prints the comparison table and returns the summary."""
    from dfu_ml.search.report import format_search_table
    from pipelines.local_run import DEFAULT_SYNTH_PATIENTS, execute

    summary = execute(
        lambda runtime: build_search_pipeline(config, settings, runtime, local=True),
        _collect_search,
        out,
        data,
        seed=config.seed,
        synth_patients=synth_patients or DEFAULT_SYNTH_PATIENTS,
        describe=f", {len(settings.combinations)} combinations, {config.cv_folds} folds, "
        f"profile {config.profile}, final model {settings.final_model}",
        summary_file="search.json",
        log=log,
        quiet=quiet,
        runner=runner,
        runtime=runtime,
    )
    out = Path(out).resolve()
    log("")
    log(format_search_table(summary))
    log(
        f"search: {out / 'search.json'}  table: {out / 'search.md'}  report: "
        f"{out / 'search.html'}  final model: {summary['final_model_dir']}  "
        f"({summary['seconds']} s)"
    )
    return summary


def _collect_search(outputs: dict, staging: Path, run) -> dict:
    """The search's results: search.json, the table (HTML, Markdown, plot), the final model."""
    from pipelines.local_run import collect_results

    return collect_results(
        outputs, staging, run, "search.json", SEARCH_RESULT_FILES, "final_model_dir"
    )
