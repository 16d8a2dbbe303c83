"""``dfu-kfp diagnose`` end to end: the diagnose pipeline through kfp.local on the session's tiny
synthetic dataset (2 folds, every variant, a few epochs), and the relations its report must tell
truthfully, read from diagnose.json.

What holds by construction of a revert is asserted outright (one update per epoch, a fusion
weight that cannot move, Stage 2 overriding Stage 1, fewer trainable parameters); what depends on
the data is asserted through what the report says, recomputed here from its own per-fold figures:
a root cause's check tripped, or the report says the fix made no measurable difference, or it
says the verdict missed a measurable cost.
"""

import contextlib
import io
import json

import numpy as np
import pytest

from dfu_ml.diagnose import FIXED, PRE_FIX, ROOT_CAUSES, VARIANTS
from dfu_ml.diagnose_report import MIN_KAPPA_EFFECT

pytestmark = pytest.mark.slow

# A few epochs of each stage and a small forest: the smallest run that still trains every stage.
TINY = [
    "modalities=metadata,depth_rgb",
    "cv_folds=2",
    "pretrain_epochs=4",
    "stage1_epochs=3",
    "stage2_epochs=2",
    "rf_n_estimators=30",
    "rf_inner_folds=2",
]


@pytest.fixture(scope="module")
def diagnosed(synthetic_dir, tmp_path_factory):
    from pipelines.cli import main

    out = tmp_path_factory.mktemp("diagnose") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["diagnose", "--data", str(synthetic_dir), "--out", str(out), "--set", *TINY])
    assert code == 0, printed.getvalue()[-2000:]
    return json.loads((out / "diagnose.json").read_text()), printed.getvalue(), out


def _variant(diagnosis, name):
    return next(v for v in diagnosis["variants"] if v["variant"] == name)


def _finding(diagnosis, rc_id):
    return next(f for f in diagnosis["root_causes"] if f["root_cause"] == rc_id)


def test_every_variant_trains_the_same_folds_and_the_report_is_written(diagnosed):
    diagnosis, printed, out = diagnosed
    assert [v["variant"] for v in diagnosis["variants"]] == list(VARIANTS)
    assert diagnosis["folds"] == [0, 1]
    for v in diagnosis["variants"]:
        assert sorted(v["kappa"]["per_fold"]) == ["0", "1"]
        assert np.mean(list(v["kappa"]["per_fold"].values())) == pytest.approx(v["kappa"]["mean"])
        for fold in v["folds"]:
            assert set(fold["best_epoch"]) == {"pretrain[depth_rgb]", "stage1", "stage2"}
            assert fold["stage2"] in ("improved", "kept Stage 1", "overrode Stage 1")
    assert _variant(diagnosis, FIXED)["settings"] == {}
    html = (out / "diagnose.html").read_text()
    assert "<img" in html and (out / "diagnose_kappa.png").stat().st_size > 1000
    markdown = (out / "diagnose.md").read_text()
    for finding in diagnosis["root_causes"]:
        assert finding["line"] in printed and finding["line"] in markdown
        assert finding["root_cause"] in html
    assert diagnosis["pre_fix"]["line"] in printed
    assert "minus-RC6" in printed and "failing checks" in printed


def test_the_pre_fix_settings_fail_the_verdict_and_score_lower(diagnosed):
    diagnosis, _, _ = diagnosed
    pre_fix = _variant(diagnosis, PRE_FIX)
    assert not pre_fix["passed"]
    assert {"fusion_weight_learned", "steps_per_epoch_minimum"} <= set(pre_fix["failed_checks"])
    # Lower on every fold, by far more than a few validation rows changing class.
    cost = diagnosis["pre_fix"]["cost"]
    assert min(cost["per_fold"]) > 0.1 and cost["measurable"]
    assert not diagnosis["pre_fix"]["passed"] and "verdict FAIL" in diagnosis["pre_fix"]["line"]


def test_each_revert_shows_its_symptom(diagnosed):
    """What a revert does by construction, in every fold's figures."""
    diagnosis, _, _ = diagnosed
    fixed = _variant(diagnosis, FIXED)["folds"]
    minus = {rc.id: _variant(diagnosis, rc.variant)["folds"] for rc in ROOT_CAUSES}
    for f, rc3, rc4, rc5, rc6 in zip(fixed, minus["RC3"], minus["RC4"], minus["RC5"], minus["RC6"]):
        assert rc3["trainable_params"]["stage1"] < f["trainable_params"]["stage1"]
        assert rc4["stage2"] in ("improved", "overrode Stage 1")
        assert abs(rc5["fusion_rf_weight"]["moved"]) < 1e-6 < abs(f["fusion_rf_weight"]["moved"])
        assert (
            set(rc6["steps_per_epoch"].values()) == {1} and min(f["steps_per_epoch"].values()) > 1
        )
    for f, rc2 in zip(fixed, minus["RC2"]):
        ratio = [max(a) / min(a) for a in (f["alpha"]["fusion"], rc2["alpha"]["fusion"])]
        assert ratio[0] <= 3.0 + 1e-9 and ratio[1] >= ratio[0] - 1e-9
    for rc in ("RC5", "RC6"):
        assert _finding(diagnosis, rc)["finding"] == "flagged"
    assert "fusion_weight_learned" in _finding(diagnosis, "RC5")["own_checks_tripped"]
    assert "steps_per_epoch_minimum" in _finding(diagnosis, "RC6")["own_checks_tripped"]
    # Stage 2 at 1e-6 cannot beat Stage 1 and is used anyway.
    assert "stage2_improves_or_stage1_kept" in _finding(diagnosis, "RC4")["tripped"]


@pytest.mark.parametrize("rc", ROOT_CAUSES, ids=lambda rc: rc.id)
def test_each_root_cause_is_flagged_or_said_to_make_no_measurable_difference(diagnosed, rc):
    """The report's finding, recomputed from its own per-fold kappas and failing checks."""
    diagnosis, _, _ = diagnosed
    fixed, minus = _variant(diagnosis, FIXED), _variant(diagnosis, rc.variant)
    finding = _finding(diagnosis, rc.id)
    diffs = [fixed["kappa"]["per_fold"][f] - minus["kappa"]["per_fold"][f] for f in ("0", "1")]
    measurable = abs(np.mean(diffs)) > max(np.std(diffs, ddof=1), MIN_KAPPA_EFFECT)
    assert finding["cost"]["per_fold"] == pytest.approx(diffs)
    assert finding["cost"]["measurable"] == measurable
    tripped = [c for c in minus["failed_checks"] if c not in fixed["failed_checks"]]
    assert (
        finding["tripped"] == tripped and f"trips checks [{', '.join(tripped)}]" in finding["line"]
    )
    own = [c for c in rc.checks if c in tripped]
    if own:
        assert (
            finding["finding"] == "flagged"
            and "flagged by the check written for it" in (finding["line"])
        )
    elif not measurable:
        assert finding["finding"] in ("no_measurable_difference", "other_checks")
        assert "no measurable" in finding["line"]
    else:
        # A measurable change its check did not catch: said plainly, never called no difference.
        assert finding["finding"] in ("missed", "fix_costs_kappa")
        assert "no measurable" not in finding["line"]
