"""Runtime settings: where and how a pipeline runs, kept apart from what it trains.

The training configuration (:class:`dfu_ml.config.Config`) defines the experiment and, with the
code and the data, the model id. These settings say where the steps run and which services they
talk to (component images, GPU placement, the object store, where blessed models go). They change
the compiled YAML, never a result, so the same experiment keeps its model id in every output
folder and on every cluster.

They come from the defaults below, then an optional YAML file (``dfu-kfp compile --runtime
FILE``), then ``--set key=value`` for the keys named here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dfu_ml import __version__
from dfu_ml.config import parse_override
from dfu_ml.errors import ConfigError

IMAGES_FILE = Path(__file__).resolve().parent.parent / "docker" / "images.json"
DEFAULT_IMAGES = {
    "cpu": f"localhost/dfu-kfp-cpu:{__version__}",
    "gpu": f"localhost/dfu-kfp-gpu:{__version__}",
}


@dataclass(frozen=True)
class RuntimeSettings:
    """Every runtime setting, with the default that matches ``manifests/``."""

    # Component images; `docker/build.sh` writes docker/images.json with digests.
    images: dict = field(default_factory=lambda: dict(DEFAULT_IMAGES))
    gpu_accelerator_type: str = "nvidia.com/gpu"
    gpu_accelerator_limit: int = 1
    gpu_node_selector: dict = field(default_factory=lambda: {"dfu-kfp/node-pool": "gpu"})
    gpu_toleration: dict = field(
        default_factory=lambda: {
            "key": "nvidia.com/gpu",
            "operator": "Exists",
            "effect": "NoSchedule",
        }
    )
    # Secret with keys accesskey / secretkey (manifests/base/s3-secret.yaml).
    s3_secret_name: str = "dfu-kfp-s3"
    s3_endpoint: str = "dfu-minio:9000"  # host:port of the S3 endpoint the steps read and write
    s3_secure: bool = False
    # Default of the `models_uri` run parameter; empty means "publish nothing".
    models_uri: str = ""
    # A PersistentVolumeClaim the GPU steps mount at compile_cache_path for a persistent
    # compilation cache shared by every GPU step (dfu_ml/training/compile_cache.py); empty means
    # none. ReadWriteMany where GPU steps run on several nodes at once.
    compile_cache_pvc: str = ""
    compile_cache_path: str = "/var/cache/dfu-kfp/compile"

    def replace(self, **changes) -> RuntimeSettings:
        return from_dict({**dataclasses.asdict(self), **changes})

    def unpinned_images(self) -> list[str]:
        """Image references a cluster cannot trust to stay the same (no digest, or local)."""
        return sorted(
            ref
            for ref in self.images.values()
            if "@sha256:" not in ref or ref.startswith("localhost/")
        )


FIELDS = {f.name: f for f in dataclasses.fields(RuntimeSettings)}


def is_runtime_key(key: str) -> bool:
    return key in FIELDS


def from_dict(values: dict, source: str = "runtime settings") -> RuntimeSettings:
    defaults = RuntimeSettings()
    checked = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(
                f"{source}: unknown runtime setting {key!r}; known: {', '.join(sorted(FIELDS))}"
            )
        default = getattr(defaults, key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(
                f"{source}: runtime setting {key!r} must be a {type(default).__name__}, got "
                f"{value!r}"
            )
        checked[key] = value
    images = checked.get("images")
    if images is not None and set(images) != {"cpu", "gpu"}:
        raise ConfigError(f"{source}: 'images' must name exactly a cpu and a gpu image: {images}")
    return RuntimeSettings(**checked)


def images_from_file(path: Path = IMAGES_FILE) -> dict:
    """Image references written by ``docker/build.sh`` ({"cpu": REF, "gpu": REF}), if any."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        images = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); run docker/build.sh again") from None
    return {k: images[k] for k in ("cpu", "gpu") if k in images}


def load_runtime(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> RuntimeSettings:
    """Defaults (images from docker/images.json when it exists), a YAML file, then overrides."""
    values: dict = {}
    images = images_from_file()
    if images:
        values["images"] = {**DEFAULT_IMAGES, **images}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"runtime settings file {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"runtime settings file {path} must hold a mapping of settings")
        values.update(loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        values[key] = value
    return from_dict(values, source=str(path or "runtime settings"))


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` overrides into (training config, runtime settings) by key."""
    config, runtime = [], []
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        (runtime if is_runtime_key(key) else config).append(text)
    return config, runtime


def unpinned_warning(runtime: RuntimeSettings) -> str | None:
    """A warning text when a cluster would run unpinned or local images, else None."""
    unpinned = runtime.unpinned_images()
    if not unpinned:
        return None
    return (
        f"compiling with unpinned or local images {unpinned}: a cluster cannot pull localhost/ "
        "images, and KFP's cache ignores mutable tags. Build and push with "
        "`DFU_REGISTRY=registry.example/team bash docker/build.sh --push` (it writes "
        "docker/images.json with digests) or pass --set images='{cpu: REF@sha256:..., gpu: ...}'."
    )
