"""Clinical features: fixed category lists, leaky and identifier columns dropped, imputation and
scaling fitted on training rows only.

The encoders never look at the data to decide categories (the lists live in ``schema``), so a
split that lacks a category encodes exactly like one that has it, and an unseen value at inference
becomes missing (ordinal) or all-zero (one-hot) instead of an error.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd

from dfu_ml.data import schema


def _normalise_text(series: pd.Series) -> pd.Series:
    return series.astype("string").str.strip().str.lower().str.replace(" ", "", regex=False)


def encode_clinical(visits: pd.DataFrame) -> pd.DataFrame:
    """Turn raw clinical columns into numbers (NaN for missing), without fitting anything."""
    columns = {}
    for column in schema.NUMERIC_FEATURE_COLUMNS:
        values = visits[column] if column in visits else pd.Series(np.nan, index=visits.index)
        columns[column] = pd.to_numeric(values, errors="coerce").astype(float)
    for column, categories in schema.ORDINAL_TEXT_COLUMNS.items():
        codes = {name: float(i) for i, name in enumerate(categories)}
        values = visits[column] if column in visits else pd.Series(pd.NA, index=visits.index)
        columns[column] = _normalise_text(values).map(codes).astype(float)
    for column, categories in schema.NOMINAL_TEXT_COLUMNS.items():
        values = visits[column] if column in visits else pd.Series(pd.NA, index=visits.index)
        text = _normalise_text(values)
        missing = text.isna().to_numpy()
        for category in categories:
            hot = (text == category).fillna(False).to_numpy(dtype=float, copy=True)
            hot[missing] = np.nan  # a missing value is missing, not "none of the categories"
            columns[f"{column}={category}"] = hot
    return pd.DataFrame(columns, index=visits.index)


class ClinicalFeatureTransformer:
    """Median imputation and standard scaling, fitted on training visits only.

    ``fit(train_visits)`` then ``transform(any_visits)``; columns that are entirely missing in
    the training rows are imputed with 0 and left unscaled.
    """

    def __init__(self) -> None:
        self.columns_: list[str] | None = None
        self.medians_: np.ndarray | None = None
        self.means_: np.ndarray | None = None
        self.scales_: np.ndarray | None = None

    def fit(self, visits: pd.DataFrame) -> "ClinicalFeatureTransformer":
        encoded = encode_clinical(visits)
        values = encoded.to_numpy(dtype=float)
        self.columns_ = list(encoded.columns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column is expected
            medians = np.nanmedian(values, axis=0) if len(values) else np.zeros(values.shape[1])
        self.medians_ = np.where(np.isnan(medians), 0.0, medians)
        filled = np.where(np.isnan(values), self.medians_, values)
        self.means_ = filled.mean(axis=0) if len(filled) else np.zeros(filled.shape[1])
        scales = filled.std(axis=0) if len(filled) else np.ones(filled.shape[1])
        self.scales_ = np.where(scales > 1e-12, scales, 1.0)
        return self

    def transform(self, visits: pd.DataFrame) -> np.ndarray:
        if self.columns_ is None:
            raise RuntimeError("ClinicalFeatureTransformer.transform called before fit")
        encoded = encode_clinical(visits).reindex(columns=self.columns_)
        values = encoded.to_numpy(dtype=float)
        filled = np.where(np.isnan(values), self.medians_, values)
        return ((filled - self.means_) / self.scales_).astype(np.float32)

    def fit_transform(self, visits: pd.DataFrame) -> np.ndarray:
        return self.fit(visits).transform(visits)

    def to_json(self) -> str:
        return json.dumps(
            {
                "columns": self.columns_,
                "medians": self.medians_.tolist(),
                "means": self.means_.tolist(),
                "scales": self.scales_.tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "ClinicalFeatureTransformer":
        data = json.loads(text)
        out = cls()
        out.columns_ = data["columns"]
        out.medians_, out.means_, out.scales_ = (
            np.asarray(data[k]) for k in ("medians", "means", "scales")
        )
        return out
