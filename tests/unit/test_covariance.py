"""Tier 1: the covariance-type registry against scikit-learn, and the option names."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture as SKGaussianMixture
from sklearn.mixture import _gaussian_mixture as skgm

from dkm import _typing, covariance
from dkm.config import ModelConfig, RuntimeConfig, ZarrData
from dkm.covariance import DegenerateComponentError

GAUSSIAN = ["full", "tied", "diag", "spherical"]
K, D = 3, 4


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, D)) * [1.0, 2.0, 0.5, 3.0] + 50.0
    resp = rng.dirichlet(np.ones(K), size=200)
    return X, resp


def _moments_around(X, resp, c, kind):
    """Second moments around ``c_k`` summed directly from the differences."""
    diff = X[None, :, :] - c[:, None, :]  # (k, n, d)
    full = np.einsum("kn,kna,knb->kab", resp.T, diff, diff)
    return {
        "full": full,
        "tied": full.sum(axis=0),
        "diag": np.einsum("kaa->ka", full),
        "spherical": np.einsum("kaa->k", full),
    }[kind.name]


@pytest.mark.parametrize("name", GAUSSIAN)
def test_estimate_and_precisions_are_scikit_learns(name, sample):
    X, resp = sample
    kind = covariance.of(name)
    nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps
    means = resp.T @ X / nk[:, None]
    shift = np.round(means)  # the moments are taken around a shift, as in a fit
    sxx = _moments_around(X, resp, shift, kind)
    cov = kind.add_reg(kind.estimate(sxx, nk, means - shift), 1e-6)
    expected = getattr(skgm, f"_estimate_gaussian_covariances_{name}")(resp, X, nk, means, 1e-6)
    # scikit-learn's tied and diag subtract raw moments: ~1e-10 lost at |x| ≈ 50
    np.testing.assert_allclose(cov, expected, rtol=1e-9)
    assert cov.shape == kind.precision_shape(K, D) == kind.sxx_shape(K, D)
    pc = kind.precision_cholesky(cov)
    sk_pc = skgm._compute_precision_cholesky(cov, name)
    np.testing.assert_allclose(
        kind.log_det(pc, D), skgm._compute_log_det_cholesky(sk_pc, name, D), rtol=1e-12
    )
    precisions = kind.precisions(pc)
    np.testing.assert_allclose(precisions, kind.precisions(sk_pc), rtol=1e-10)
    np.testing.assert_allclose(kind.covariances(pc), cov, rtol=1e-10)
    np.testing.assert_allclose(
        kind.precisions(kind.cholesky_of_precisions(precisions)), precisions, rtol=1e-10
    )


@pytest.mark.parametrize("name", GAUSSIAN)
def test_parameter_count_is_scikit_learns(name):
    X = np.random.default_rng(1).normal(size=(50, D))
    sk = SKGaussianMixture(K, covariance_type=name, max_iter=200, random_state=0).fit(X)
    assert covariance.of(name).n_parameters(K, D) == sk._n_parameters()
    assert covariance.IDENTITY.n_parameters(K, D) == K * D  # means only


@pytest.mark.parametrize("name", GAUSSIAN)
def test_moment_shift_is_exact(name, sample):
    """``around`` moves moments taken around one point to any other, for every type."""
    X, resp = sample
    kind = covariance.of(name)
    old = np.random.default_rng(2).normal(size=(K, D)) * 10
    new = old + np.random.default_rng(3).normal(size=(K, D))
    nk = resp.sum(axis=0)
    sx = resp.T @ X - nk[:, None] * old  # first moments around the old shift
    moved = kind.around(_moments_around(X, resp, old, kind), sx, nk, new - old)
    np.testing.assert_allclose(moved, _moments_around(X, resp, new, kind), rtol=1e-11)


def test_lookup_by_name_and_by_moments():
    assert tuple(covariance.TYPES) == _typing.COVARIANCE_TYPES
    for kind in covariance.TYPES.values():
        assert covariance.of(kind.name) is kind
        assert covariance.of_moments(kind.moments) is kind
    assert covariance.of_moments("none") is covariance.IDENTITY
    assert covariance.IDENTITY.unit and covariance.IDENTITY.sxx_shape(K, D) is None
    assert covariance.TIED.shared and covariance.FULL.dense
    with pytest.raises(ValueError, match="covariance_type: expected one of identity, full"):
        covariance.of("fulll")
    with pytest.raises(ValueError, match="moments: expected one of none, spherical"):
        covariance.of_moments("identity")


def test_degenerate_components_are_named():
    cov = np.stack([np.eye(D), np.zeros((D, D)), np.eye(D)])
    assert covariance.FULL.degenerate(cov)[0] == [1]
    with pytest.raises(DegenerateComponentError, match=r"component\(s\) 1"):
        covariance.FULL.precision_cholesky(cov)
    with pytest.raises(DegenerateComponentError, match="shared"):
        covariance.TIED.precision_cholesky(np.zeros((D, D)))
    assert covariance.DIAG.degenerate(np.array([[1.0, 1.0], [1.0, -1.0]]))[0] == [1]


def test_option_names_are_spelled_once():
    """The config's fields take their values from dkm._typing's Literals."""
    fields = {
        (ModelConfig, "covariance_type"): _typing.COVARIANCE_TYPES,
        (ModelConfig, "assignment"): _typing.ASSIGNMENTS,
        (ModelConfig, "on_degenerate"): _typing.ON_DEGENERATE,
        (ModelConfig, "criterion"): _typing.CRITERIA,
        (ModelConfig, "mode"): _typing.MODES,
        (ZarrData, "nan_policy"): _typing.NAN_POLICIES,
        (RuntimeConfig, "persist"): _typing.PERSIST_POLICIES,
    }
    for (model, name), values in fields.items():
        annotation = model.model_fields[name].annotation
        literals = [a for a in (annotation, *get_args(annotation)) if get_args(a)]
        assert any(get_args(a) == values for a in literals), (model.__name__, name)
    init = ModelConfig.model_fields["init"].annotation
    assert _typing.ConfigInit in get_args(init)
    assert set(get_args(_typing.ConfigInit)) == {*_typing.KMEANS_INITS, _typing.KMEANS_FIT_INIT}
    assert set(_typing.MIXTURE_INITS) > set(_typing.KMEANS_INITS)
    with pytest.raises(ValueError, match="nan_policy: expected one of raise, drop, got 'skip'"):
        _typing.parse_nan_policy("skip")
