"""Put Keras's ImageNet weights files of every supported backbone where ``backbone_weights:
imagenet`` finds them (``$KERAS_HOME/models``, Keras's own file names: see
:data:`dfu_ml.training.models.IMAGENET_FILES`).

Run at image build time, where there is internet (``docker/Dockerfile.gpu``, build argument
``IMAGENET_WEIGHTS``); pods on a cluster usually have none, and training never downloads.

    python -m dfu_ml.training.imagenet [BACKBONE ...]
"""

from __future__ import annotations

import sys

from dfu_ml.training import models


def download(backbones=None) -> list:
    """Download (through keras.applications, which checks each file's hash) and return the files;
    an error when Keras stored a file under another name than the table says."""
    import keras

    paths = []
    for backbone in backbones or sorted(models.IMAGENET_FILES):
        factory = keras.applications
        for part in models.APPLICATIONS[backbone].split("."):
            factory = getattr(factory, part)
        factory(include_top=False, pooling="avg", input_shape=(224, 224, 3), weights="imagenet")
        path = models.imagenet_weights_file(backbone)  # a ConfigError when it is not there
        print(f"{backbone}: {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    download(sys.argv[1:])
