"""Clinical features as one scikit-learn pipeline: the column policy, fixed category lists, and
missing values kept missing.

Which columns reach the model is the column policy (``ClinicalColumns``, groups in
``dfu_ml.data.schema``): measured columns always, the columns decided after the assessment only
with ``clinical_include_leak_suspect``, never identifiers, label-derived or free-text columns.

The pipeline has two steps and learns nothing that a split could change: category lists are fixed
in the schema, so a split that lacks a category encodes exactly like one that has it.

1. ``ClinicalFrame`` takes the policy's columns from a visits frame (a column absent from the CSV
   is missing everywhere), numbers as floats, text normalised (" Left" -> "left"), and a text value
   outside the fixed list becomes missing (``unseen_category_values`` names them for a warning).
2. A ``ColumnTransformer``: numbers pass through, ordinal text becomes its header's numbering,
   nominal text is one-hot encoded against the fixed list plus a "missing" column.

Missing values stay missing (NaN, or the "missing" one-hot column): every clinical model here
takes NaN natively, so nothing is imputed, and nothing is scaled (trees do not need it). Median
imputation erased information: "Exudate Appearance" is missing for 21 % of the real visits and 40 %
of those are remodelling against 5 % where it is present; imputed, a missing value read as
"haemoserous" (docs/RESULTS.md measures what keeping it costs or gains).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

from dfu_ml.data import schema

MISSING = "missing"


@dataclass(frozen=True)
class ClinicalColumns:
    """The raw clinical columns a model uses, by encoding, under one column policy."""

    numeric: tuple[str, ...]
    ordinal: tuple[str, ...]
    nominal: tuple[str, ...]
    include_leak_suspect: bool = False

    @classmethod
    def for_policy(cls, include_leak_suspect: bool = False) -> ClinicalColumns:
        allowed = set(schema.MEASURED_COLUMNS)
        if include_leak_suspect:
            allowed |= set(schema.DECIDED_AFTER_ASSESSMENT_COLUMNS)

        def pick(columns):
            return tuple(c for c in columns if c in allowed)

        return cls(
            numeric=pick(schema.NUMERIC_FEATURE_COLUMNS),
            ordinal=pick(schema.ORDINAL_TEXT_COLUMNS),
            nominal=pick(schema.NOMINAL_TEXT_COLUMNS),
            include_leak_suspect=include_leak_suspect,
        )

    @property
    def used(self) -> list[str]:
        """Every raw column that reaches the model, in CSV order."""
        chosen = set(self.numeric + self.ordinal + self.nominal)
        return [c for c in schema.CLINICAL_COLUMNS if c in chosen]

    @property
    def categories(self) -> dict[str, tuple[str, ...]]:
        text = {**schema.ORDINAL_TEXT_COLUMNS, **schema.NOMINAL_TEXT_COLUMNS}
        return {c: text[c] for c in self.ordinal + self.nominal}

    def report(self) -> dict:
        """What the data report and summary.json list: the columns used and why others are not."""
        leak_suspect = [
            c
            for c in schema.LEAK_SUSPECT_COLUMNS
            if c not in self.used and c not in schema.LABEL_DERIVED_COLUMNS
        ]
        return {
            "include_leak_suspect": self.include_leak_suspect,
            "used": self.used,
            "excluded": {
                "identifiers": list(schema.IDENTIFIER_COLUMNS),
                "label_derived": list(schema.LABEL_DERIVED_COLUMNS),
                "leak_suspect": leak_suspect,
                "free_text": [c for c in schema.FREE_TEXT_COLUMNS if c not in leak_suspect],
            },
        }


def normalise_text(series: pd.Series) -> pd.Series:
    """Case, surrounding and inner blanks do not matter: " Haemo serous" -> "haemoserous"."""
    return series.astype("string").str.strip().str.lower().str.replace(" ", "", regex=False)


def _column(visits: pd.DataFrame, column: str) -> pd.Series:
    return visits[column] if column in visits else pd.Series(np.nan, index=visits.index)


class ClinicalFrame(TransformerMixin, BaseEstimator):
    """Step 1 of the feature pipeline: the policy's columns as floats and normalised text (an
    unseen or absent value is ``np.nan``). Stateless; parameters are plain lists and dicts."""

    def __init__(self, numeric=(), categories=None):
        self.numeric = numeric
        self.categories = categories

    def fit(self, visits, y=None):
        return self

    def transform(self, visits: pd.DataFrame) -> pd.DataFrame:
        columns = {}
        for column in self.numeric:
            values = pd.to_numeric(_column(visits, column), errors="coerce")
            columns[column] = values.astype(float)
        for column, known in (self.categories or {}).items():
            text = normalise_text(_column(visits, column))
            is_known = text.isin(known).fillna(False).to_numpy(dtype=bool)
            values = np.full(len(text), np.nan, dtype=object)
            values[is_known] = text[is_known].to_numpy(dtype=object)
            columns[column] = values
        return pd.DataFrame(columns, index=visits.index)

    def get_feature_names_out(self, input_features=None):
        return np.asarray([*self.numeric, *(self.categories or {})], dtype=object)


def _one_hot_name(column: str, category) -> str:
    return f"{column}={MISSING if not isinstance(category, str) else category}"


def feature_pipeline(columns: ClinicalColumns) -> Pipeline:
    """The unfitted feature pipeline for ``columns`` (fit it on training visits only)."""
    categories = columns.categories
    encode = ColumnTransformer(
        [
            ("measured", "passthrough", list(columns.numeric)),
            (
                "ordinal",
                OrdinalEncoder(
                    categories=[list(categories[c]) for c in columns.ordinal],
                    handle_unknown="use_encoded_value",
                    unknown_value=np.nan,
                    encoded_missing_value=np.nan,
                    dtype=float,
                ),
                list(columns.ordinal),
            ),
            (
                "nominal",
                OneHotEncoder(
                    # np.nan as the last category: a missing value gets its own column.
                    categories=[[*categories[c], np.nan] for c in columns.nominal],
                    handle_unknown="ignore",
                    sparse_output=False,
                    dtype=float,
                    feature_name_combiner=_one_hot_name,
                ),
                list(columns.nominal),
            ),
        ],
        verbose_feature_names_out=False,
    )
    frame = ClinicalFrame(
        numeric=list(columns.numeric), categories={c: list(v) for c, v in categories.items()}
    )
    return Pipeline([("select", frame), ("encode", encode)])


def unseen_category_values(visits: pd.DataFrame, categories: dict) -> list[tuple]:
    """``(column, value, visits)`` for every text value outside its column's fixed list in
    ``categories`` (column -> known values): the model reads it as missing, and prediction warns
    about each."""
    out = []
    for column, known in categories.items():
        if column not in visits:
            continue
        raw = visits[column]
        unseen = raw.notna() & ~normalise_text(raw).isin(known).fillna(False)
        for value, count in raw[unseen].astype(str).value_counts(sort=False).items():
            out.append((column, value, int(count)))
    return out
