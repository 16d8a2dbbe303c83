"""A persistent compilation cache for the GPU steps, so that a compiled step is built once.

Every KFP step is a new process: a training step compiled with XLA (TensorFlow, JAX) or
``torch.compile`` is compiled again in each of the fifteen-odd GPU steps of a cross-validation
unless the compiled programs are kept on a volume the steps share. Each framework reads its cache
folder from the environment; :func:`cache_environment` names one folder per framework under one
root, which the pipeline mounts from a PersistentVolumeClaim (runtime setting
``compile_cache_pvc``, ``pipelines/pipeline.py``) and the GPU benchmark may point anywhere.
"""

from __future__ import annotations

import os

# Where the pipeline mounts the claim in the GPU steps (runtime setting compile_cache_path).
DEFAULT_ROOT = "/var/cache/dfu-kfp/compile"


def cache_environment(root: str) -> dict[str, str]:
    """Environment variables that put every backend's persistent compilation cache under
    ``root``: JAX's compilation cache, TorchInductor's FX-graph/kernel cache (and Triton's), and
    TensorFlow's XLA persistent cache."""
    root = root.rstrip("/")
    return {
        "JAX_COMPILATION_CACHE_DIR": f"{root}/jax",
        "TORCHINDUCTOR_CACHE_DIR": f"{root}/torchinductor",
        "TRITON_CACHE_DIR": f"{root}/triton",
        "TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={root}/tensorflow-xla",
    }


def use_cache(root: str) -> dict[str, str]:
    """Set :func:`cache_environment` in this process (before the backend is imported); values
    already set win. Returns what is in effect."""
    for key, value in cache_environment(root).items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in cache_environment(root)}
