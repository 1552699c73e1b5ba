"""The option names of dkm, spelled once: for each option a ``Literal``, the ``Final``
tuple of its values (derived from it) and one ``parse_*`` function that config,
estimators and kernels use to validate a value. What a covariance type *does* is in
:mod:`dkm.covariance`.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

#: The covariance types of the mixture family; identity is k-means.
CovarianceType = Literal["identity", "full", "tied", "diag", "spherical"]
#: Each point to its most likely component, or responsibilities.
Assignment = Literal["hard", "soft"]
#: Which second moments a pass accumulates; "none" for k-means (means only).
Moments = Literal["none", "spherical", "diag", "tied", "full"]
#: What the M-step does with an empty or non-positive-definite mixture component.
OnDegenerate = Literal["error", "reseed", "drop"]
#: How k-means searches rows: "lloyd" every row in every pass; "hamerly" keeps Hamerly's
#: bounds between passes once the centres settle (the same results, bit for bit); "auto"
#: is "hamerly".
KMeansAlgorithm = Literal["auto", "lloyd", "hamerly"]
#: Rows with NaN or infinity: an error naming the row, or left out (labelled -1).
NanPolicy = Literal["raise", "drop"]
#: How a list of candidate numbers of clusters is decided (lower wins).
Criterion = Literal["bic", "aic"]
#: Keep the points in cluster memory: auto (if they take under half of it), always, never.
PersistPolicy = Literal["auto", "always", "never"]
#: The estimators' ``schedule`` (:mod:`dkm.engine.schedule`).
ScheduleName = Literal["auto", "sampled", "full"]
#: What a config's ``model.mode`` names: (identity, hard) or a mixture.
Mode = Literal["kmeans", "gmm"]
#: k-means‖ (Bahmani et al., 2012): candidates sampled over the whole data.
ParallelInit = Literal["k-means||"]
#: A mixture's means from a k-means fit.
KMeansFitInit = Literal["kmeans"]
#: scikit-learn's name of random points as a mixture's start.
RandomFromData = Literal["random_from_data"]
#: ``KMeans(init=…)`` by name.
KMeansInit = Literal["k-means++", "k-means||", "random"]
#: ``GaussianMixture(init_params=…)`` by name.
MixtureInit = Literal[KMeansFitInit, KMeansInit, RandomFromData]
#: A config's ``model.init`` by name (for either mode).
ConfigInit = Literal[KMeansInit, KMeansFitInit]

COVARIANCE_TYPES: Final[tuple[CovarianceType, ...]] = get_args(CovarianceType)
ASSIGNMENTS: Final[tuple[Assignment, ...]] = get_args(Assignment)
MOMENTS: Final[tuple[Moments, ...]] = get_args(Moments)
ON_DEGENERATE: Final[tuple[OnDegenerate, ...]] = get_args(OnDegenerate)
NAN_POLICIES: Final[tuple[NanPolicy, ...]] = get_args(NanPolicy)
CRITERIA: Final[tuple[Criterion, ...]] = get_args(Criterion)
PERSIST_POLICIES: Final[tuple[PersistPolicy, ...]] = get_args(PersistPolicy)
SCHEDULES: Final[tuple[ScheduleName, ...]] = get_args(ScheduleName)
#: The schedules that may sample (the third, "full", never does).
SAMPLING_SCHEDULES: Final[tuple[ScheduleName, ...]] = SCHEDULES[:2]
MODES: Final[tuple[Mode, ...]] = get_args(Mode)
KMEANS_INITS: Final[tuple[KMeansInit, ...]] = get_args(KMeansInit)
MIXTURE_INITS: Final[tuple[MixtureInit, ...]] = get_args(MixtureInit)
KMEANS_ALGORITHMS: Final[tuple[KMeansAlgorithm, ...]] = get_args(KMeansAlgorithm)
#: The one name each of these initialisations has.
PARALLEL_INIT: Final[ParallelInit] = get_args(ParallelInit)[0]
KMEANS_FIT_INIT: Final[KMeansFitInit] = get_args(KMeansFitInit)[0]


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming both."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def parse_covariance_type(value: object, name: str = "covariance_type") -> CovarianceType:
    return check_choice(name, value, COVARIANCE_TYPES)  # type: ignore[return-value]


def parse_assignment(value: object, name: str = "assignment") -> Assignment:
    return check_choice(name, value, ASSIGNMENTS)  # type: ignore[return-value]


def parse_moments(value: object, name: str = "moments") -> Moments:
    return check_choice(name, value, MOMENTS)  # type: ignore[return-value]


def parse_on_degenerate(value: object, name: str = "on_degenerate") -> OnDegenerate:
    return check_choice(name, value, ON_DEGENERATE)  # type: ignore[return-value]


def parse_nan_policy(value: object, name: str = "nan_policy") -> NanPolicy:
    return check_choice(name, value, NAN_POLICIES)  # type: ignore[return-value]


def parse_criterion(value: object, name: str = "criterion") -> Criterion:
    return check_choice(name, value, CRITERIA)  # type: ignore[return-value]


def parse_persist_policy(value: object, name: str = "persist") -> PersistPolicy:
    return check_choice(name, value, PERSIST_POLICIES)  # type: ignore[return-value]


def parse_schedule(value: object, name: str = "schedule") -> ScheduleName:
    return check_choice(name, value, SCHEDULES)  # type: ignore[return-value]


def parse_mode(value: object, name: str = "mode") -> Mode:
    return check_choice(name, value, MODES)  # type: ignore[return-value]


def parse_kmeans_init(value: object, name: str = "init") -> KMeansInit:
    return check_choice(name, value, KMEANS_INITS)  # type: ignore[return-value]


def parse_mixture_init(value: object, name: str = "init_params") -> MixtureInit:
    return check_choice(name, value, MIXTURE_INITS)  # type: ignore[return-value]


def parse_kmeans_algorithm(value: object, name: str = "algorithm") -> KMeansAlgorithm:
    return check_choice(name, value, KMEANS_ALGORITHMS)  # type: ignore[return-value]
