"""The dfu-kfp pipeline DAG: one definition, run by ``kfp.local`` or compiled for a cluster.

Its run parameters are declared once, in ``pipelines/run_parameters.py``; which images it runs
in, where the GPU steps go and how the steps reach object storage come from the runtime settings
(``pipelines/settings.py``), never from the training configuration.

A metadata-only configuration compiles to the same DAG without the image steps. GPU steps get an
accelerator, a node selector and a toleration; steps that talk to object storage get the
credentials from a Kubernetes secret as environment variables, and retries.

kfp.local (2.17) quirk this DAG respects: inside a ParallelFor nested in another, a task may take
artifacts from the outer loop's body but not its parameters (they resolve to the inner loop's item),
so every per-fold value reaches the per-modality steps as an artifact.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Model

from components.clinical_rf import clinical_forest
from components.common import code_version
from components.evaluate import evaluate_folds
from components.prepare import prepare_data
from components.pretrain_image import pretrain_encoder
from components.publish import bundle_model, publish_model
from components.resample_alpha import make_fold_plan
from components.stage1 import stage1_fusion
from components.stage2 import stage2_finetune
from dfu_ml.config import Config
from dfu_ml.training.compile_cache import cache_environment
from dfu_ml.training.fold import FINAL_FIT
from pipelines.acceptance import ExpectedPlacement
from pipelines.run_parameters import MAIN
from pipelines.settings import RuntimeSettings

PIPELINE_NAME = "dfu-kfp"
S3_ENV = {"accesskey": "DFU_S3_ACCESS_KEY", "secretkey": "DFU_S3_SECRET_KEY"}
# The component images' user (docker/Dockerfile.cpu and .gpu: USER 1000:1000); every step runs
# as it, non-root, on the cluster.
IMAGE_USER = 1000

DESCRIPTION = """DFU healing-phase classifier: staged fusion training with patient-grouped
cross-validation, evaluation, a training-health verdict and publishing of blessed models.

Stages (per cross-validation fold, then once more on all patients as the final fit):
1. resolve run configuration: the run parameters over the compiled configuration.
2. prepare data: crop every image modality's wound box, pack crops and clinical rows.
3. split, resample, focal alpha: the fold's patients, resampled training rows, capped alphas.
4. clinical random forest: out-of-fold probabilities for training visits.
5. pre-train image encoder (per modality, GPU): equal alpha, early stopping on kappa.
6. Stage 1 (GPU): fusion model, backbones frozen, learnable fusion weight.
7. Stage 2 (GPU): fine-tune the top of the backbones; keep Stage 1 when it does not improve.
8. evaluate folds: metrics per row and per visit, plots, the health verdict and the blessing.
9. final fit on all patients with the folds' median best epochs, bundle the final model.
10. publish the blessed model to models_uri (never overwriting a published model id)."""


class Outputs(NamedTuple):
    """What the pipeline returns (the local runner reads these, as the KFP UI shows them)."""

    summary: Dataset
    final_model: Model


# Components that run on the GPU node pool, and those that talk to object storage (the compiled
# YAML is checked against these by pipelines/acceptance.py).
GPU_COMPONENTS = frozenset({"pretrain-encoder", "stage1-fusion", "stage2-finetune"})
STORAGE_COMPONENTS = frozenset({"prepare-data", "publish-model"})


def expected_placement(runtime: RuntimeSettings | None = None) -> ExpectedPlacement:
    runtime = runtime or RuntimeSettings()
    return ExpectedPlacement(
        GPU_COMPONENTS,
        STORAGE_COMPONENTS,
        dict(runtime.gpu_node_selector),
        runtime.s3_secret_name,
        run_as_user=IMAGE_USER,
        gpu_pvc=runtime.compile_cache_pvc,
    )


def _as_image_user(component):
    """The component, whose every task runs as the images' non-root user. kfp-kubernetes sets
    only these identity fields; seccomp, capabilities and privilege escalation are the KFP
    backend's to set, and the root filesystem stays writable (see the README)."""

    def task(**arguments):
        return kubernetes.set_security_context(
            component(**arguments),
            run_as_user=IMAGE_USER,
            run_as_group=IMAGE_USER,
            run_as_non_root=True,
        )

    return task


class Steps:
    """The pipeline's components, bound to their images (CPU or GPU); on a cluster (not
    ``local``) every task runs as the images' non-root user."""

    def __init__(self, images: dict, local: bool = False):
        def component(func, image):
            made = dsl.component(func, base_image=image, install_kfp_package=False)
            return made if local else _as_image_user(made)

        cpu, gpu = images["cpu"], images["gpu"]
        self.resolve = component(MAIN.resolve_function(), cpu)
        self.prepare = component(prepare_data, cpu)
        self.plan = component(make_fold_plan, cpu)
        self.forest = component(clinical_forest, cpu)
        self.pretrain = component(pretrain_encoder, gpu)
        self.stage1 = component(stage1_fusion, gpu)
        self.stage2 = component(stage2_finetune, gpu)
        self.evaluate = component(evaluate_folds, cpu)
        self.bundle = component(bundle_model, cpu)
        self.publish = component(publish_model, cpu)


class Placement:
    """Where a task runs on the cluster; locally (kfp.local honours none of it) nothing is set."""

    def __init__(self, runtime: RuntimeSettings, local: bool = False):
        self.runtime, self.local = runtime, local

    def gpu(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        if self.local:
            return task
        runtime = self.runtime
        task.set_accelerator_type(runtime.gpu_accelerator_type)
        task.set_accelerator_limit(runtime.gpu_accelerator_limit)
        for key, value in runtime.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        toleration = runtime.gpu_toleration
        kubernetes.add_toleration(
            task,
            key=toleration.get("key"),
            operator=toleration.get("operator", "Exists"),
            value=toleration.get("value"),
            effect=toleration.get("effect"),
        )
        if runtime.compile_cache_pvc:
            # One compilation cache for every GPU step: compiled once, not in each step's process.
            kubernetes.mount_pvc(
                task, pvc_name=runtime.compile_cache_pvc, mount_path=runtime.compile_cache_path
            )
            for name, value in cache_environment(runtime.compile_cache_path).items():
                task.set_env_variable(name, value)
        return task

    def storage(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        """Steps that talk to object storage: credentials from the secret, and retries."""
        if self.local:
            return task
        runtime = self.runtime
        kubernetes.use_secret_as_env(
            task, secret_name=runtime.s3_secret_name, secret_key_to_env=S3_ENV
        )
        task.set_env_variable("DFU_S3_ENDPOINT", runtime.s3_endpoint)
        task.set_env_variable("DFU_S3_SECURE", "true" if runtime.s3_secure else "false")
        task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
        return task


def train_fold(
    steps: Steps,
    place: Placement,
    label: str,
    prepared,
    fold,
    settings,
    modalities,
    image_run: bool,
    final_fit=None,
):
    """One fold's chain (``label`` names its tasks in the UI: "fold" or "final fit").

    ``final_fit`` (the evaluation summary) fixes each stage's epochs. Returns the forest task
    and, for image runs, the Stage 2 task.
    """
    fixed = {} if final_fit is None else {"final_fit": final_fit}
    plan = steps.plan(prepared=prepared, fold=fold, config=settings)
    plan.set_display_name(f"{label} · split, resample, focal alpha")
    fold_plan = plan.outputs["fold_plan"]
    forest = steps.forest(prepared=prepared, fold_plan=fold_plan, config=settings)
    forest.set_display_name(f"{label} · clinical random forest")
    if not image_run:
        return forest, None
    with dsl.ParallelFor(modalities, name=f"{label} · image modalities") as modality:
        encoder = place.gpu(
            steps.pretrain(
                prepared=prepared, fold_plan=fold_plan, modality=modality, config=settings, **fixed
            )
        )
        encoder.set_display_name(f"{label} · pre-train image encoder")
    stage1 = place.gpu(
        steps.stage1(
            prepared=prepared,
            fold_plan=fold_plan,
            rf=forest.outputs["rf"],
            encoders=dsl.Collected(encoder.outputs["encoder"]),
            config=settings,
            **fixed,
        )
    )
    stage1.set_display_name(f"{label} · Stage 1, frozen backbones")
    stage2 = place.gpu(
        steps.stage2(
            prepared=prepared,
            fold_plan=fold_plan,
            rf=forest.outputs["rf"],
            stage1_model=stage1.outputs["model"],
            config=settings,
            **fixed,
        )
    )
    stage2.set_display_name(f"{label} · Stage 2, fine-tune")
    return forest, stage2


def build_pipeline(config: Config, runtime: RuntimeSettings | None = None, local: bool = False):
    """Return the pipeline function for ``config`` (its values become the parameter defaults).

    ``local`` leaves out what kfp.local cannot honour (secrets, GPU placement); the DAG is the same.
    """
    runtime = runtime or RuntimeSettings()
    steps, place = Steps(runtime.images, local), Placement(runtime, local)
    config_json, version = config.to_json(), code_version()
    image_run = bool(config.image_modalities)

    def body(data, models_uri, image_modalities, **values) -> Outputs:
        resolve = steps.resolve(
            config_json=config_json,
            code_version=version,
            image_modalities=image_modalities,
            **{p.name: values[p.name] for p in MAIN.resolved if p.name in values},
        )
        resolve.set_display_name("resolve run configuration")
        settings = resolve.outputs["config"]
        prepare = place.storage(steps.prepare(data=data, config=settings))
        prepare.set_display_name("prepare data")
        dataset = prepare.outputs["prepared"]
        with dsl.ParallelFor(resolve.outputs["Output"], name="cross-validation folds") as fold:
            forest, stage2 = train_fold(
                steps, place, "fold", dataset, fold, settings, image_modalities, image_run
            )
        evaluation = steps.evaluate(
            fold_results=dsl.Collected(
                stage2.outputs["model"] if image_run else forest.outputs["rf"]
            ),
            config=settings,
        )
        evaluation.set_display_name("evaluate folds · health verdict")
        summary = evaluation.outputs["summary"]
        final_forest, final_stage2 = train_fold(
            steps,
            place,
            "final fit",
            dataset,
            FINAL_FIT,
            settings,
            image_modalities,
            image_run,
            final_fit=summary,
        )
        bundle = steps.bundle(
            rf=final_forest.outputs["rf"],
            summary=summary,
            config=settings,
            data=data,
            data_digest=prepare.outputs["Output"],
            code_version=version,
            **({"model": final_stage2.outputs["model"]} if image_run else {}),
        )
        bundle.set_display_name("bundle final model")
        with dsl.If(evaluation.outputs["Output"] == True, name="blessed"):
            publish = place.storage(
                steps.publish(final_model=bundle.outputs["final_model"], models_uri=models_uri)
            )
            publish.set_display_name("publish blessed model")
        return Outputs(summary=summary, final_model=bundle.outputs["final_model"])

    function = MAIN.pipeline_function(body, PIPELINE_NAME, DESCRIPTION, config, runtime)
    function.__signature__ = function.__signature__.replace(return_annotation=Outputs)
    return dsl.pipeline(name=PIPELINE_NAME, display_name="dfu-kfp: DFU healing phase")(function)


def compile_pipeline(config: Config, output: Path, runtime: RuntimeSettings | None = None) -> Path:
    from kfp import compiler

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(config, runtime), str(output))
    return Path(output)
