"""scikit-learn's own estimator checks, run on both estimators.

One check cannot pass by construction and is asserted to be the only failure:
``check_sample_weight_equivalence_on_dense_data`` fits with integer weights and with
repeated rows from the same random seed and compares the fitted models. The random
initialisation draws differently from 15 weighted rows than from 30 repeated ones
(scikit-learn expects KMeans itself to fail it for the same reason). With the same
initial parameters, weights *are* repetitions: see
``test_integer_sample_weight_equals_repeating_rows``.
"""

from __future__ import annotations

import pytest
from sklearn.utils.estimator_checks import check_estimator

import dkm

KNOWN_FAILURES = {"check_sample_weight_equivalence_on_dense_data"}
#: dkm does not claim Array API support, so that check skips itself.
ALLOWED_SKIP_REASONS = ("SCIPY_ARRAY_API is not set",)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize(
    "estimator",
    [dkm.KMeans(n_clusters=3, n_init=2, max_iter=20), dkm.GaussianMixture(2, max_iter=20)],
    ids=["KMeans", "GaussianMixture"],
)
def test_check_estimator(estimator):
    results = check_estimator(estimator, on_fail=None, on_skip=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    skipped = {r["check_name"]: str(r["exception"]) for r in results if r["status"] == "skipped"}
    assert failed <= KNOWN_FAILURES, {
        r["check_name"]: repr(r["exception"]) for r in results if r["status"] == "failed"
    }
    for name, reason in skipped.items():
        assert any(a in reason for a in ALLOWED_SKIP_REASONS), (name, reason)
    assert sum(r["status"] == "passed" for r in results) > 40
