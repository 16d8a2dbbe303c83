"""The dfu-kfp pipeline DAG: one definition, run by ``kfp.local`` or compiled for a cluster.

prepare -> per fold (ParallelFor): resample_alpha -> clinical_rf, per image modality
(ParallelFor) pretrain_image -> stage1 -> stage2 -> evaluate (all folds) -> final fit on all
patients with the folds' best epochs -> publish (only a blessed model is pushed).

A metadata-only configuration compiles to the same DAG without the image steps.
GPU steps (pretrain_image, stage1, stage2) get an accelerator, a node selector and a toleration
from the config; MinIO credentials come from a Kubernetes secret as environment variables.
"""

import hashlib
import json
from pathlib import Path
from typing import List

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Output

from components.clinical_rf import clinical_rf_op
from components.evaluate import evaluate_op
from components.prepare import prepare_op
from components.pretrain_image import pretrain_image_op
from components.publish import publish_op
from components.resample_alpha import resample_alpha_op
from components.stage1 import stage1_op
from components.stage2 import stage2_op
from dfu_ml import __version__
from dfu_ml.config import Config

IMAGES_FILE = Path(__file__).resolve().parent.parent / "docker" / "images.json"
PIPELINE_NAME = "dfu-kfp"
S3_ENV = {"accesskey": "DFU_S3_ACCESS_KEY", "secretkey": "DFU_S3_SECRET_KEY"}


def component_images(path: Path = IMAGES_FILE) -> dict:
    """Image references the components run in (pinned by ``docker/build.sh``)."""
    default = {
        "cpu": f"localhost/dfu-kfp-cpu:{__version__}",
        "gpu": f"localhost/dfu-kfp-gpu:{__version__}",
    }
    if Path(path).is_file():
        default.update(json.loads(Path(path).read_text()))
    return default


def resolve_config_op(
    config_json: str,
    code_version: str,
    image_modalities: List[str],
    use_metadata: bool,
    cv_folds: int,
    folds: List[int],
    data_percentage: float,
    image_size: int,
    backbone: str,
    pretrain_epochs: int,
    stage1_epochs: int,
    stage2_epochs: int,
    pretrain_lr: float,
    stage1_lr: float,
    stage2_lr: float,
    alpha_max_ratio: float,
    seed: int,
    profile: str,
    models_uri: str,
    config: Output[Dataset],
):
    """Overlay the run's parameters on the compiled configuration and validate it (the loops fan
    out over the ``folds`` and ``image_modalities`` pipeline parameters themselves).

    ``code_version`` is not used here: it keys KFP's cache, so that results computed by other code
    are never reused (every step depends on this step's output).
    """
    from dfu_ml.config import config_from_json
    from dfu_ml.errors import ConfigError

    base = config_from_json(config_json)
    modalities = (["metadata"] if use_metadata else []) + list(image_modalities)
    resolved = base.replace(
        modalities=modalities,
        cv_folds=cv_folds,
        data_percentage=data_percentage,
        image_size=image_size,
        backbone=backbone,
        pretrain_epochs=pretrain_epochs,
        stage1_epochs=stage1_epochs,
        stage2_epochs=stage2_epochs,
        pretrain_lr=pretrain_lr,
        stage1_lr=stage1_lr,
        stage2_lr=stage2_lr,
        alpha_max_ratio=alpha_max_ratio,
        seed=seed,
        profile=profile,
        models_uri=models_uri,
    )
    if bool(resolved.image_modalities) != bool(base.image_modalities):
        raise ConfigError(
            f"modalities {resolved.modalities}: this pipeline was compiled for "
            f"{base.modalities}; a metadata-only run and an image run are different DAGs, so "
            "compile again with --set modalities=..."
        )
    outside = [f for f in folds if not 0 <= int(f) < resolved.cv_folds]
    if outside or not folds:
        raise ConfigError(
            f"folds {list(folds)}: each fold must be in 0..{resolved.cv_folds - 1} "
            f"(cv_folds={resolved.cv_folds}), and at least one is needed"
        )
    with open(config.path, "w") as handle:
        handle.write(resolved.to_json())


def code_version() -> str:
    """The package version plus a digest of the library, component and pipeline sources."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("dfu_ml", "components", "pipelines"):
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in (".py", ".yaml"):
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"


def _on_gpu(task: dsl.PipelineTask, config: Config) -> dsl.PipelineTask:
    task.set_accelerator_type(config.gpu_accelerator_type)
    task.set_accelerator_limit(config.gpu_accelerator_limit)
    for key, value in config.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    toleration = config.gpu_toleration
    kubernetes.add_toleration(
        task,
        key=toleration.get("key"),
        operator=toleration.get("operator", "Exists"),
        value=toleration.get("value"),
        effect=toleration.get("effect"),
    )
    return task


def _with_storage(task: dsl.PipelineTask, config: Config) -> dsl.PipelineTask:
    """Steps that talk to object storage: credentials from the secret, and retries."""
    kubernetes.use_secret_as_env(task, secret_name=config.s3_secret_name, secret_key_to_env=S3_ENV)
    task.set_env_variable("DFU_S3_ENDPOINT", config.s3_endpoint)
    task.set_env_variable("DFU_S3_SECURE", "true" if config.s3_secure else "false")
    task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
    return task


def build_pipeline(config: Config, images: dict | None = None, local: bool = False):
    """Return the pipeline function for ``config`` (its values become parameter defaults).

    ``local`` leaves out what kfp.local cannot honour (secrets, GPU placement); the DAG is the same.
    """
    images = images or component_images()
    cpu, gpu = images["cpu"], images["gpu"]

    def op(func, image):
        return dsl.component(func, base_image=image, install_kfp_package=False)

    prepare, resample, rf_step = (
        op(prepare_op, cpu),
        op(resample_alpha_op, cpu),
        op(clinical_rf_op, cpu),
    )
    pretrain, stage1, stage2 = op(pretrain_image_op, gpu), op(stage1_op, gpu), op(stage2_op, gpu)
    evaluate, publish = op(evaluate_op, cpu), op(publish_op, cpu)
    resolve = op(resolve_config_op, cpu)
    config_json = config.to_json()
    image_run = bool(config.image_modalities)

    def gpu_step(task):
        return task if local else _on_gpu(task, config)

    def storage_step(task):
        return task if local else _with_storage(task, config)

    def train_fold(prepared, fold, settings, modalities, final_fit=None):
        """The per-fold chain; ``final_fit`` (the evaluation summary) fixes each stage's epochs."""
        fixed = {} if final_fit is None else {"final_fit": final_fit}
        plan = resample(prepared=prepared, fold=fold, config=settings)
        rf = rf_step(prepared=prepared, fold_plan=plan.outputs["fold_plan"], config=settings)
        if not image_run:
            return rf, None
        with dsl.ParallelFor(modalities) as modality:
            encoder = gpu_step(
                pretrain(
                    prepared=prepared,
                    fold_plan=plan.outputs["fold_plan"],
                    modality=modality,
                    config=settings,
                    **fixed,
                )
            )
        s1 = gpu_step(
            stage1(
                prepared=prepared,
                fold_plan=plan.outputs["fold_plan"],
                rf=rf.outputs["rf"],
                encoders=dsl.Collected(encoder.outputs["encoder"]),
                config=settings,
                **fixed,
            )
        )
        s2 = gpu_step(
            stage2(
                prepared=prepared,
                fold_plan=plan.outputs["fold_plan"],
                rf=rf.outputs["rf"],
                stage1_model=s1.outputs["model"],
                config=settings,
                **fixed,
            )
        )
        return rf, s2

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="DFU healing-phase classifier: staged fusion "
        "training with patient-grouped cross-validation, evaluation and publishing",
    )
    def dfu_pipeline(
        data: str,
        image_modalities: List[str] = list(config.image_modalities),
        use_metadata: bool = config.uses_metadata,
        cv_folds: int = config.cv_folds,
        folds: List[int] = list(range(config.cv_folds)),
        data_percentage: float = config.data_percentage,
        image_size: int = config.image_size,
        backbone: str = config.backbone,
        pretrain_epochs: int = config.pretrain_epochs,
        stage1_epochs: int = config.stage1_epochs,
        stage2_epochs: int = config.stage2_epochs,
        pretrain_lr: float = config.pretrain_lr,
        stage1_lr: float = config.stage1_lr,
        stage2_lr: float = config.stage2_lr,
        alpha_max_ratio: float = config.alpha_max_ratio,
        seed: int = config.seed,
        profile: str = config.profile,
        models_uri: str = config.models_uri,
    ):
        resolved = resolve(
            config_json=config_json,
            code_version=code_version(),
            image_modalities=image_modalities,
            use_metadata=use_metadata,
            cv_folds=cv_folds,
            folds=folds,
            data_percentage=data_percentage,
            image_size=image_size,
            backbone=backbone,
            pretrain_epochs=pretrain_epochs,
            stage1_epochs=stage1_epochs,
            stage2_epochs=stage2_epochs,
            pretrain_lr=pretrain_lr,
            stage1_lr=stage1_lr,
            stage2_lr=stage2_lr,
            alpha_max_ratio=alpha_max_ratio,
            seed=seed,
            profile=profile,
            models_uri=models_uri,
        )
        settings = resolved.outputs["config"]
        prepared = storage_step(prepare(data=data, config=settings))
        dataset = prepared.outputs["prepared"]
        with dsl.ParallelFor(folds) as fold:
            rf, s2 = train_fold(dataset, fold, settings, image_modalities)
        fold_results = dsl.Collected((s2 or rf).outputs["model" if s2 else "rf"])
        evaluation = evaluate(fold_results=fold_results, config=settings)
        final_rf, final_s2 = train_fold(
            dataset, -1, settings, image_modalities, evaluation.outputs["summary"]
        )
        extra = {"model": final_s2.outputs["model"]} if final_s2 is not None else {}
        storage_step(
            publish(
                rf=final_rf.outputs["rf"],
                summary=evaluation.outputs["summary"],
                config=settings,
                models_uri=models_uri,
                data=data,
                **extra,
            )
        )

    return dfu_pipeline


def compile_pipeline(config: Config, output: Path, images: dict | None = None) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(config, images), str(output))
    return Path(output)
