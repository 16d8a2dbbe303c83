"""dfu_ml: the machine-learning library behind dfu-kfp.

Data reading and preparation, clinical features, folds, synthetic datasets, object storage,
resampling, the clinical random forest, focal loss, fusion models, staged training and the
training-health verdict. Nothing in this package knows about Kubeflow.
"""

__version__ = "0.1.0"
