"""Additive, mergeable summaries of chunks of points.

Every per-chunk result in dkm is one of these frozen objects: it has an empty value
(``zero``/``empty``) and a ``merge`` that is associative and commutative bit for bit, so
any grouping and order of the same chunks' results gives the same total. Sums are exact
(:class:`dkm.exact.ExactSum`): a merged total keeps its exact sums and its float64
fields are those sums rounded once, when first read; top-m selections break ties by
global row. A chunk's own fields are float64 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import reduce
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from dkm import _compiled, covariance
from dkm._typing import Moments, parse_moments
from dkm.codec import float_from_json, float_to_json
from dkm.exact import ExactSum

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


class Mergeable(Protocol):
    def merge(self, other: Any) -> Any: ...


M = TypeVar("M", bound=Mergeable)


def merge_all(parts: Iterable[M]) -> M:
    """Merge summaries (any order gives the same bits); one exact sum for all of them
    where the type has ``merge_many``."""
    parts = list(parts)
    many = getattr(type(parts[0]), "merge_many", None) if len(parts) > 2 else None
    if many is not None:
        return many(parts)
    return reduce(lambda a, b: a.merge(b), parts)


#: sums deposited together by ``SuffStats.merge_many`` (bounds its temporaries: ~32 bytes each)
_BATCH_SUMS = 1 << 21


class _Rounded:
    """A float field of a merged total: its exact sums rounded once, when first read.

    Installed on the class after ``@dataclass`` (which sets the field in the instance's
    ``__dict__`` for objects built from floats, shadowing this); the owner's ``_round``
    sets every such field of a merged object from its ``_exact`` sums.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        obj._round()
        return obj.__dict__[self.name]


def _rounded_fields(cls: type, names: tuple[str, ...]) -> None:
    for name in names:
        setattr(cls, name, _Rounded(name))


T = TypeVar("T")


def _merged(cls: type[T], exact: ExactSum, **fields: Any) -> T:
    """A ``cls`` holding ``fields`` and the exact sums its rounded fields come from."""
    obj = object.__new__(cls)
    for name, value in {"_exact": exact, **fields}.items():
        object.__setattr__(obj, name, value)
    return obj


def _set(obj: Any, **fields: Any) -> None:
    for name, value in fields.items():
        object.__setattr__(obj, name, value)


def _top_order(keys: F64, rows: I64) -> I64:
    """Indices sorting by key descending, ties by global row ascending (a total order)."""
    return np.lexsort((rows, -keys)).astype(np.int64)


def _top_m(keys: F64, rows: I64, m: int) -> I64:
    """Indices of the ``m`` first under :func:`_top_order`, in that order; O(n) + O(m log m).

    ``argpartition`` finds the m-th largest key; every key above it and every tie at it
    go to the exact sort, so ties at the boundary are broken by row, not by chance.
    """
    if m <= 0:
        return np.empty(0, np.int64)
    if keys.size > m:
        threshold = keys[np.argpartition(keys, keys.size - m)[keys.size - m]]
        candidates = np.flatnonzero(keys >= threshold)
    else:
        candidates = np.arange(keys.size)
    order = _top_order(keys[candidates], rows[candidates])[:m]
    return candidates[order]


@dataclass(frozen=True, eq=False)
class FarthestPoints:
    """The ``capacity`` points farthest from their assigned centre (a mergeable top-m).

    Used to re-seed empty k-means clusters the way scikit-learn does in memory, without
    a second pass: each chunk keeps its own farthest points, the merge keeps the
    farthest of the union. Ties are broken by global row index, so the result does not
    depend on chunking or merge order.

    Attributes
    ----------
    distances : (m,) squared distance of each point to the centre it was assigned to.
    rows : (m,) global row index.  points : (m, d).  weights : (m,).  labels : (m,).
    """

    capacity: int
    distances: F64
    rows: I64
    points: F64
    weights: F64
    labels: I64

    @classmethod
    def empty(cls, capacity: int, n_features: int) -> FarthestPoints:
        return cls(
            capacity,
            np.empty(0),
            np.empty(0, np.int64),
            np.empty((0, n_features)),
            np.empty(0),
            np.empty(0, np.int64),
        )

    @classmethod
    def from_chunk(
        cls,
        capacity: int,
        distances: NDArray[Any],
        points: NDArray[Any],
        weights: NDArray[Any],
        labels: NDArray[Any],
        row_offset: int,
    ) -> FarthestPoints:
        """Keep the farthest ``capacity`` points of a chunk with positive weight."""
        keep = np.flatnonzero(weights > 0)
        dist = np.asarray(distances, np.float64)[keep]
        rows = keep.astype(np.int64) + row_offset
        top = _top_m(dist, rows, capacity)
        keep = keep[top]
        return cls(
            capacity,
            dist[top],
            rows[top],
            np.asarray(points[keep], np.float64),
            np.asarray(weights[keep], np.float64),
            np.asarray(labels[keep], np.int64),
        )

    def merge(self, other: FarthestPoints) -> FarthestPoints:
        if other.capacity != self.capacity:
            raise ValueError("cannot merge FarthestPoints of different capacities")
        dist = np.concatenate([self.distances, other.distances])
        rows = np.concatenate([self.rows, other.rows])
        order = _top_order(dist, rows)[: self.capacity]
        return FarthestPoints(
            self.capacity,
            dist[order],
            rows[order],
            np.concatenate([self.points, other.points])[order],
            np.concatenate([self.weights, other.weights])[order],
            np.concatenate([self.labels, other.labels])[order],
        )


def sxx_shape(moments: Moments, k: int, d: int) -> tuple[int, ...] | None:
    """Shape of the second-moment array for a moment kind (None for k-means)."""
    return covariance.of_moments(moments).sxx_shape(k, d)


#: Moments whose matrices are symmetric: their sums keep one triangle (half the exact
#: sums' work and bytes on a (k, d, d) array of full moments).
SYMMETRIC_MOMENTS = ("full", "tied")


def _stacked(a: F64) -> F64:
    """A (d, d) matrix or (k, d, d) stack as a C-contiguous float64 (m, d, d) stack."""
    return np.ascontiguousarray(a, np.float64).reshape(-1, a.shape[-2], a.shape[-1])


def _deposited_sxx(moments: Moments, sxx: F64) -> F64:
    if moments not in SYMMETRIC_MOMENTS:
        return sxx.ravel()
    stack = _stacked(sxx)
    d = stack.shape[-1]
    tri = np.empty((stack.shape[0], d * (d + 1) // 2))
    _compiled.lower_triangles(stack, tri)
    return tri.ravel()


def _read_sxx(moments: Moments, flat: F64, shape: tuple[int, ...]) -> F64:
    if moments not in SYMMETRIC_MOMENTS:
        return flat.reshape(shape)
    sxx = np.empty(shape)
    stack = sxx.reshape(-1, shape[-2], shape[-1])
    _compiled.from_lower_triangles(np.ascontiguousarray(flat).reshape(stack.shape[0], -1), stack)
    return sxx


def symmetric(stats: SuffStats) -> SuffStats:
    """``stats`` with full or tied second moments exactly symmetric: each matrix's upper
    triangle set to its lower one (a product ``Aᵀ B`` or a moment shift can leave them a
    last bit apart). The engine's chunk results are: a merge keeps one triangle, so a
    chunk's statistics merged with zero keep their bits."""
    if stats.sxx is None or stats.moments not in SYMMETRIC_MOMENTS:
        return stats
    sxx = np.array(stats.sxx, np.float64)  # a copy, C-contiguous
    _compiled.mirror_lower(sxx.reshape(-1, sxx.shape[-2], sxx.shape[-1]))
    return replace(stats, sxx=sxx)


@dataclass(frozen=True, eq=False)
class SuffStats:
    """Sufficient statistics of a mixture E-step over some rows.

    For responsibilities ``r_ik`` (0/1 when hard), sample weights ``w_i`` and the
    per-component shift ``c_k`` that the pass was run with (the previous means):

    Attributes
    ----------
    nk : (k,) ``Σ w r_ik``.
    sx : (k, d) ``Σ w r_ik (x_i − c_k)``.
    sxx : second moments around ``c_k``: full (k, d, d), diag (k, d), spherical (k,)
        (summed over features), tied (d, d) (summed over components); None for k-means.
    objective : ``Σ w min_k ‖x − μ_k‖²`` (k-means) or ``Σ w log p(x_i)``.
    n : ``Σ w``.
    count : number of rows seen (unweighted).
    farthest : candidates for re-seeding empty clusters, or None.
    searched : rows whose nearest centre was searched for (k-means: those the Hamerly
        bounds did not settle); None where the kernel does not count them.
    """

    moments: Moments
    nk: F64
    sx: F64
    sxx: F64 | None
    objective: float
    n: float
    count: int
    farthest: FarthestPoints | None = field(default=None)
    searched: int | None = None

    @classmethod
    def zero(
        cls, n_components: int, n_features: int, moments: Moments = "none", n_farthest: int = 0
    ) -> SuffStats:
        """The identity of ``merge``."""
        shape = sxx_shape(moments, n_components, n_features)
        return cls(
            moments,
            np.zeros(n_components),
            np.zeros((n_components, n_features)),
            None if shape is None else np.zeros(shape),
            0.0,
            0.0,
            0,
            FarthestPoints.empty(n_farthest, n_features) if n_farthest else None,
        )

    @property
    def n_components(self) -> int:
        return self._dims()[0]

    @property
    def n_features(self) -> int:
        return self._dims()[1]

    def _dims(self) -> tuple[int, int]:
        dims: tuple[int, int] | None = self.__dict__.get("_dims_")
        return (int(self.nk.shape[0]), int(self.sx.shape[1])) if dims is None else dims

    def _sums(self) -> ExactSum:
        """The exact sums: a merged total's own, else this object's floats deposited."""
        exact: ExactSum | None = self.__dict__.get("_exact")
        return ExactSum.of(self._flat()) if exact is None else exact

    def _flat(self) -> F64:
        """The sums deposited: ``nk``, ``sx``, ``sxx`` (of full and tied moments, the
        lower triangle of each matrix: they are symmetric, see :func:`symmetric`; a
        total's upper triangle is its lower one, so statistics read from an earlier
        dkm's record, a last bit from symmetric, merge as their lower triangle),
        ``objective``, ``n``."""
        sxx = [] if self.sxx is None else [_deposited_sxx(self.moments, self.sxx)]
        tail = np.array([self.objective, self.n])
        return np.concatenate([self.nk.ravel(), self.sx.ravel(), *sxx, tail])

    def _round(self) -> None:
        k, d = self._dims()
        flat = self.__dict__["_exact"].to_float()
        shape = sxx_shape(self.moments, k, d)
        end = k + k * d
        sxx = None if shape is None else _read_sxx(self.moments, flat[end:-2], shape)
        _set(self, nk=flat[:k], sx=flat[k:end].reshape(k, d), sxx=sxx)
        _set(self, objective=float(flat[-2]), n=float(flat[-1]))

    def to_dict(self) -> dict[str, Any]:
        """The sums as a record: ``moments``, the arrays ``nk``, ``sx`` and ``sxx`` (left
        out when None), ``objective``, ``n`` (JSON numbers, see :mod:`dkm.codec`) and
        ``count``. ``farthest`` and ``searched`` describe one pass and are not kept."""
        record: dict[str, Any] = {"moments": self.moments, "nk": self.nk, "sx": self.sx}
        if self.sxx is not None:
            record["sxx"] = self.sxx
        record.update(
            objective=float_to_json(self.objective),
            n=float_to_json(self.n),
            count=int(self.count),
        )
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> SuffStats:
        """The statistics :meth:`to_dict` gave (arrays as float64); ValueError naming what
        is missing or of the wrong shape."""
        try:
            moments = parse_moments(record["moments"])
            nk = np.asarray(record["nk"], np.float64)
            sx = np.asarray(record["sx"], np.float64)
            objective = float_from_json(record["objective"])
            n = float_from_json(record["n"])
        except KeyError as e:
            raise ValueError(f"sufficient statistics without {e}") from None
        sxx = record.get("sxx")
        sxx = None if sxx is None else np.asarray(sxx, np.float64)
        if sx.ndim != 2 or nk.shape != sx.shape[:1]:
            raise ValueError(f"nk {nk.shape} and sx {sx.shape} disagree")
        want = sxx_shape(moments, sx.shape[0], sx.shape[1])
        if (sxx is None) != (want is None) or (sxx is not None and sxx.shape != want):
            raise ValueError(f"sxx has the wrong shape for {moments} moments")
        return cls(moments, nk, sx, sxx, objective, n, int(record.get("count", 0)))

    def merge(self, other: SuffStats) -> SuffStats:
        """The exact elementwise sum, rounded once when read (associative and commutative
        bit for bit; ``zero`` is its identity)."""
        return SuffStats.merge_many([self, other])

    @staticmethod
    def merge_many(parts: Sequence[SuffStats]) -> SuffStats:
        """The merge of all ``parts`` (any order gives the same bits), one exact sum."""
        first = parts[0]
        for other in parts[1:]:
            first._check_mergeable(other)
        far = (
            None
            if first.farthest is None
            else reduce(FarthestPoints.merge, [p.farthest for p in parts if p.farthest])
        )
        searched = [p.searched for p in parts]
        held = [p.__dict__["_exact"] for p in parts if "_exact" in p.__dict__]
        floats = [p._flat() for p in parts if "_exact" not in p.__dict__]
        # chunks' results: deposited a batch at a time (a few million sums per batch)
        step = max(1, _BATCH_SUMS // max(floats[0].size, 1)) if floats else 1
        for i in range(0, len(floats), step):
            held.append(ExactSum.total_of(np.stack(floats[i : i + step])))
        return _merged(
            SuffStats,
            ExactSum.sum_of(held),
            _dims_=first._dims(),
            moments=first.moments,
            count=sum(p.count for p in parts),
            farthest=far,
            # a part that did not count them adds nothing (the engine's parts all count)
            searched=None if all(s is None for s in searched) else sum(s or 0 for s in searched),
        )

    def _check_mergeable(self, other: SuffStats) -> None:
        if self.moments != other.moments or self._dims() != other._dims():
            raise ValueError(
                f"cannot merge statistics of kind {self.moments} {self._dims()} "
                f"with {other.moments} {other._dims()}"
            )
        if (self.farthest is None) != (other.farthest is None):
            raise ValueError("cannot merge statistics with and without farthest points")

    def plus(self, other: SuffStats) -> SuffStats:
        """The float64 elementwise sum, in this order: the blocks of one chunk (a chunk's
        result must not depend on its exact sums; chunks are combined by ``merge``)."""
        self._check_mergeable(other)
        sxx = None if self.sxx is None or other.sxx is None else self.sxx + other.sxx
        far = (
            None
            if self.farthest is None or other.farthest is None
            else self.farthest.merge(other.farthest)
        )
        return SuffStats(
            self.moments,
            self.nk + other.nk,
            self.sx + other.sx,
            sxx,
            self.objective + other.objective,
            self.n + other.n,
            self.count + other.count,
            far,
            # a part that did not count them adds nothing (the engine's parts all count)
            None
            if self.searched is None and other.searched is None
            else (self.searched or 0) + (other.searched or 0),
        )

    __add__ = merge


_rounded_fields(SuffStats, ("nk", "sx", "sxx", "objective", "n"))


@dataclass(frozen=True, eq=False)
class WeightedSample:
    """A weighted random sample without replacement, mergeable across chunks.

    Each row gets the key ``log(u_i) / w_i`` (Efraimidis–Spirakis) where ``u_i`` is a
    hash of the seed and the row's *global* index, so the sample is the same whatever
    the chunking, worker count or merge order; the ``capacity`` largest keys win.
    Rows of zero weight are never sampled.
    """

    capacity: int
    keys: F64
    rows: I64
    points: F64
    weights: F64

    @classmethod
    def empty(cls, capacity: int, n_features: int) -> WeightedSample:
        return cls(
            capacity, np.empty(0), np.empty(0, np.int64), np.empty((0, n_features)), np.empty(0)
        )

    @classmethod
    def from_chunk(
        cls,
        capacity: int,
        X: NDArray[Any],
        weights: NDArray[Any],
        row_offset: int,
        seed: int,
    ) -> WeightedSample:
        rows = np.arange(row_offset, row_offset + X.shape[0], dtype=np.int64)
        w = np.asarray(weights, np.float64)
        keep = np.flatnonzero(w > 0)
        u = uniform_from_rows(rows[keep], seed)
        keys = np.log(u) / w[keep]
        top = _top_m(keys, rows[keep], capacity)
        keep = keep[top]
        return cls(
            capacity,
            keys[top],
            rows[keep],
            np.asarray(X[keep], np.float64),
            w[keep],
        )

    def merge(self, other: WeightedSample) -> WeightedSample:
        keys = np.concatenate([self.keys, other.keys])
        rows = np.concatenate([self.rows, other.rows])
        order = _top_order(keys, rows)[: self.capacity]
        return WeightedSample(
            self.capacity,
            keys[order],
            rows[order],
            np.concatenate([self.points, other.points])[order],
            np.concatenate([self.weights, other.weights])[order],
        )

    def in_row_order(self) -> WeightedSample:
        order = np.argsort(self.rows, kind="stable")
        return WeightedSample(
            self.capacity,
            self.keys[order],
            self.rows[order],
            self.points[order],
            self.weights[order],
        )


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(z: NDArray[np.uint64]) -> NDArray[np.uint64]:
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniform_from_rows(rows: I64, seed: int) -> F64:
    """A uniform number in (0, 1) per global row index: a counter-based generator."""
    key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0]
    h = _splitmix64(rows.astype(np.uint64) ^ key)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


@dataclass(frozen=True, eq=False)
class RowSample:
    """The rows of positive weight whose uniform number (a hash of the seed and the
    row's *global* index, :func:`uniform_from_rows`) falls below ``rate``: a Bernoulli
    sample of the data drawn chunk by chunk, the same rows whatever the chunking, the
    worker count or the merge order. Merging concatenates; :meth:`nested` reads the
    rows in key order, so that the sample's first ``m`` rows are the Bernoulli sample
    at the rate of the ``m``-th key: samples of growing size, each inside the next.

    Attributes
    ----------
    keys : (m,) the rows' uniform numbers.  rows : (m,) global row indices.
    points : (m, d) the rows (float64).  weights : (m,) their sample weights.
    """

    rate: float
    keys: F64
    rows: I64
    points: F64
    weights: F64

    @classmethod
    def empty(cls, rate: float, n_features: int) -> RowSample:
        return cls(rate, np.empty(0), np.empty(0, np.int64), np.empty((0, n_features)), np.empty(0))

    @classmethod
    def from_chunk(
        cls, rate: float, X: NDArray[Any], weights: NDArray[Any], row_offset: int, seed: int
    ) -> RowSample:
        """The chunk's rows in the sample; rows of zero weight are never in it."""
        rows = np.arange(row_offset, row_offset + X.shape[0], dtype=np.int64)
        w = np.asarray(weights, np.float64)
        keep = np.flatnonzero(w > 0)
        u = uniform_from_rows(rows[keep], seed)
        chosen = u < rate
        keep = keep[chosen]
        return cls(rate, u[chosen], rows[keep], np.asarray(X[keep], np.float64), w[keep])

    def merge(self, other: RowSample) -> RowSample:
        return RowSample(
            self.rate,
            np.concatenate([self.keys, other.keys]),
            np.concatenate([self.rows, other.rows]),
            np.concatenate([self.points, other.points]),
            np.concatenate([self.weights, other.weights]),
        )

    @property
    def size(self) -> int:
        return int(self.rows.size)

    def nested(self) -> RowSample:
        """The same rows in the order of their keys (ties by row): each prefix is the
        sample at a lower rate."""
        return self._taken(np.lexsort((self.rows, self.keys)))

    def first(self, m: int) -> RowSample:
        """The ``m`` rows of lowest key (of a :meth:`nested` sample), in row order."""
        return self._taken(np.argsort(self.rows[:m], kind="stable"))

    def _taken(self, order: NDArray[np.intp]) -> RowSample:
        """The rows at ``order``, in that order."""
        return RowSample(
            self.rate, self.keys[order], self.rows[order], self.points[order], self.weights[order]
        )


#: The seed of a :class:`RowSample` is the summary's, mixed with this: its rows are not
#: those of the summary's weighted sample.
ROW_SAMPLE_SALT = 0x5DEECE66D


@dataclass(frozen=True, eq=False)
class DataSummary:
    """One pass over the data: counts, per-feature mean and variance, a sample, checks.

    Mean and variance are unweighted (scikit-learn's k-means tolerance uses
    ``np.var(X, axis=0)``). A chunk has its float64 mean ``m_c`` and ``m2_c =
    Σ (x − m_c)²``, NumPy's bits without a float64 copy of the chunk
    (:func:`_chunk_moments`; a finite mean also says that every value is finite, else
    every row is checked); a merged total keeps, exactly, ``A = Σ n_c m_c``,
    ``B = Σ n_c m_c²`` (products split into floats without error) and ``Q = Σ m2_c``, and
    reads ``mean = A / n`` and ``m2 = Q + B − A² / n`` (Chan's parallel update, in exact
    arithmetic), each rounded once: the same bits in any grouping, and a chunk's own
    floats when merged with empty ones. ``weight`` is ``Σ w``, exact.
    """

    count: int
    weight: float
    mean: F64
    m2: F64
    n_nonfinite: int
    first_nonfinite_row: int
    n_bad_weights: int
    first_bad_weight_row: int
    n_positive: int
    sample: WeightedSample
    max_abs: float = 0.0
    #: The rows of a :class:`RowSample` at the rate the pass was asked for (None: none).
    rows_sample: RowSample | None = None

    @classmethod
    def from_chunk(
        cls,
        X: NDArray[Any],
        weights: NDArray[Any],
        row_offset: int,
        sample_size: int,
        seed: int,
        drop_nonfinite: bool = False,
        rows_rate: float = 0.0,
    ) -> DataSummary:
        """Summarise a chunk; ``drop_nonfinite`` leaves rows with NaN/inf out of it all
        (they are still counted in ``n_nonfinite``). ``rows_rate`` > 0 draws a
        :class:`RowSample` at that rate too."""
        summary = cls._from_chunk(X, weights, row_offset, sample_size, seed, drop_nonfinite)
        if rows_rate <= 0:
            return summary
        d = X.shape[1]
        if summary.n_bad_weights or (summary.n_nonfinite and not drop_nonfinite):
            rows = RowSample.empty(rows_rate, d)
        elif summary.n_nonfinite:  # dropped rows: no weight, so never drawn (nor read)
            finite = np.isfinite(X).all(axis=1)
            w = np.where(finite, np.asarray(weights, np.float64), 0.0)
            rows = RowSample.from_chunk(rows_rate, X, w, row_offset, seed ^ ROW_SAMPLE_SALT)
        else:  # the summary has checked every row already
            rows = RowSample.from_chunk(rows_rate, X, weights, row_offset, seed ^ ROW_SAMPLE_SALT)
        return replace(summary, rows_sample=rows)

    @classmethod
    def _from_chunk(
        cls,
        X: NDArray[Any],
        weights: NDArray[Any],
        row_offset: int,
        sample_size: int,
        seed: int,
        drop_nonfinite: bool,
    ) -> DataSummary:
        X = _float_rows(X)
        n, d = X.shape
        mean, m2, max_abs = _chunk_moments(X) if n else (np.zeros(d), np.zeros(d), 0.0)
        finite_sums = bool(np.isfinite(mean).all())
        if finite_sums:  # NaN and ±inf propagate: every value is finite
            n_nonfinite, first_bad = 0, -1
        else:  # a NaN or inf, or finite values whose sum overflows: check every row
            finite_rows = np.isfinite(X).all(axis=1)
            n_nonfinite = int(n - np.count_nonzero(finite_rows))
            first_bad = int(np.argmin(finite_rows)) + row_offset if n_nonfinite else -1
        w = np.asarray(weights, np.float64)
        bad_w = ~np.isfinite(w) | (w < 0)
        n_bad_w = int(np.count_nonzero(bad_w))
        first_bad_w = int(np.argmax(bad_w)) + row_offset if n_bad_w else -1
        if drop_nonfinite and n_nonfinite and not n_bad_w:
            kept = cls._from_chunk(X[finite_rows], w[finite_rows], 0, sample_size, seed, False)
            # the sample must name global rows: redo it with zero weight on dropped rows
            # (rows of zero weight are never drawn, nor read)
            w0 = np.where(finite_rows, w, 0.0)
            sample = WeightedSample.from_chunk(sample_size, X, w0, row_offset, seed)
            return replace(kept, n_nonfinite=n_nonfinite, first_nonfinite_row=first_bad,
                           sample=sample)  # fmt: skip
        if n_nonfinite or n_bad_w or n == 0:
            # Statistics of bad data are meaningless; the engine raises on the counts.
            mean, m2 = np.zeros(d), np.zeros(d)
            sample = WeightedSample.empty(sample_size, d)
            return cls(n, 0.0, mean, m2, n_nonfinite, first_bad, n_bad_w, first_bad_w, 0, sample)
        if not finite_sums:  # finite values whose sum overflows float64
            mean, m2 = _scaled_moments(X)
        sample = WeightedSample.from_chunk(sample_size, X, w, row_offset, seed)
        n_pos = int(np.count_nonzero(w > 0))
        return cls(n, float(w.sum()), mean, m2, 0, -1, 0, -1, n_pos, sample, max_abs)

    def merge(self, other: DataSummary) -> DataSummary:
        firsts = [r for r in (self.first_nonfinite_row, other.first_nonfinite_row) if r >= 0]
        firsts_w = [r for r in (self.first_bad_weight_row, other.first_bad_weight_row) if r >= 0]
        return _merged(
            DataSummary,
            self._sums().merge(other._sums()),
            count=self.count + other.count,
            n_nonfinite=self.n_nonfinite + other.n_nonfinite,
            first_nonfinite_row=min(firsts, default=-1),
            n_bad_weights=self.n_bad_weights + other.n_bad_weights,
            first_bad_weight_row=min(firsts_w, default=-1),
            n_positive=self.n_positive + other.n_positive,
            sample=self.sample.merge(other.sample),
            max_abs=max(self.max_abs, other.max_abs),
            rows_sample=(
                None
                if self.rows_sample is None or other.rows_sample is None
                else self.rows_sample.merge(other.rows_sample)
            ),
        )

    def _sums(self) -> ExactSum:
        exact: ExactSum | None = self.__dict__.get("_exact")
        if exact is None:
            exact = _summary_sums(self.count, self.mean, self.m2, self.weight)
        return exact

    def _round(self) -> None:
        exact = self.__dict__["_exact"]
        d = (exact.shape[0] - 1) // 7
        flat = exact.to_float()
        sums = exact.to_fractions()
        n = self.count
        mean, m2 = np.zeros(d), np.zeros(d)
        for j in range(d if n else 0):
            a = sums[j] + sums[d + j]
            b = sums[2 * d + j] + sums[3 * d + j] + sums[4 * d + j] + sums[5 * d + j]
            q = sums[6 * d + j]
            if isinstance(a, Fraction) and isinstance(b, Fraction) and isinstance(q, Fraction):
                mean[j] = float(a / n)
                m2[j] = max(float(q + b - a * a / n), 0.0)
            else:  # non-finite statistics (values overflowing float64) stay non-finite
                mean[j] = float(a) / n
                m2[j] = float(q) + float(b)
        _set(self, weight=float(flat[-1]), mean=mean, m2=m2)

    @property
    def sample_is_complete(self) -> bool:
        """True when the sample holds every row of positive weight (not a subsample)."""
        return self.n_positive <= self.sample.capacity

    @property
    def variance(self) -> F64:
        return self.m2 / max(self.count, 1)


_rounded_fields(DataSummary, ("weight", "mean", "m2"))


def _float_rows(X: NDArray[Any]) -> NDArray[Any]:
    """``X`` as the compiled summary passes read it in place: float32 or float64 in
    native byte order, any layout; other dtypes as a float64 copy."""
    X = np.asarray(X)
    if X.dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        return X
    return X.astype(np.float64)


#: float64 bytes per block of columns that :func:`_chunk_moments` converts at a time
_BLOCK_BYTES = 1 << 20


def _chunk_moments(X: NDArray[Any]) -> tuple[F64, F64, float]:
    """``(mean, m2, max |x|)`` per column of a chunk of at least one row, the bits of
    ``m = X64.mean(axis=0)`` and ``((X64 − m)²).sum(axis=0)`` for ``X64`` the chunk in
    float64 (NumPy's, so scikit-learn's), without that copy. ``mean`` is non-finite
    where a column holds a NaN or inf or its sum overflows (``m2`` is then meaningless).

    Rows whose features are the inner axis, which NumPy sums row after row: two compiled
    reads (:func:`dkm._compiled.column_sums`). Columns contiguous (or one feature),
    which NumPy sums pairwise down each column: blocks of columns in float64, of at most
    :data:`_BLOCK_BYTES` (a column at the least).
    """
    n, d = X.shape
    if d > 1 and abs(X.strides[1]) < abs(X.strides[0]):
        sums, amax = np.full(d, -0.0), np.zeros(d, X.dtype)
        _compiled.column_sums(X, 1.0, sums, amax)
        mean = sums / n
        m2 = np.zeros(d)
        if np.isfinite(mean).all():
            _compiled.centred_square_sums(X, mean, m2)
        return mean, m2, float(amax.max(initial=0.0))
    mean, m2 = np.empty(d), np.empty(d)
    step = max(1, _BLOCK_BYTES // (8 * n))
    with np.errstate(all="ignore"):  # non-finite values: mean says so
        for a in range(0, d, step):
            block = np.asarray(X[:, a : a + step], np.float64)
            mean[a : a + step] = m = block.mean(axis=0)
            dev = np.subtract(block, m)
            m2[a : a + step] = np.square(dev, out=dev).sum(axis=0)
    max_abs = max(float(X.max(initial=0.0)), -float(X.min(initial=0.0)))
    return mean, m2, max_abs


def _scaled_moments(X: NDArray[Any]) -> tuple[F64, F64]:
    """``(mean, m2)`` per column of finite values whose sums overflow float64: summed
    scaled by ``2^-k`` (exact), in row order; ``m2`` is +inf where it overflows."""
    n, d = X.shape
    scale = 2.0 ** -(n.bit_length() + 1)  # |Σ scale·x| <= max|x| / 2
    sums, amax = np.full(d, -0.0), np.zeros(d, X.dtype)
    _compiled.column_sums(X, scale, sums, amax)
    mean = sums / n / scale
    m2 = np.zeros(d)
    _compiled.centred_square_sums(X, mean, m2)
    return mean, m2


def _summary_sums(count: int, mean: F64, m2: F64, weight: float) -> ExactSum:
    """A :class:`DataSummary`'s exact sums, (7d + 1,): ``A`` in two floats, ``B`` in four
    (scaled by powers of two: the exponents of ``mean``), ``Q``, ``weight``."""
    frac, e = np.frexp(mean)  # mean = frac · 2^e, frac in [0.5, 1): no overflow
    e = e.astype(np.int64)
    n = np.full_like(frac, float(count))
    sq_hi, sq_lo = _two_product(frac, frac)
    values = [
        *_two_product(n, frac),
        *_two_product(n, sq_hi),
        *_two_product(n, sq_lo),
        m2,
        np.array([weight]),
    ]
    exponents = [e, e, 2 * e, 2 * e, 2 * e, 2 * e, np.zeros(e.size + 1, np.int64)]
    return ExactSum.of(np.concatenate(values), np.concatenate(exponents))


def _two_product(a: F64, b: F64) -> tuple[F64, F64]:
    """``(p, e)`` with ``p + e = a·b`` exactly (Dekker), for finite ``a·b`` that neither
    overflows nor underflows; non-finite inputs give non-finite ``p``."""
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    with np.errstate(invalid="ignore"):
        e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return p, e


def _split(a: F64) -> tuple[F64, F64]:
    """Veltkamp's split: ``a = hi + lo`` with 26 significant bits in each."""
    c = 134217729.0 * a  # 2^27 + 1
    with np.errstate(invalid="ignore"):
        hi = c - (c - a)
    return hi, a - hi


@dataclass(frozen=True, eq=False)
class CandidateSample:
    """One k-means‖ round over some rows: the rows' total cost and their top priorities.

    In a round with current candidates ``C``, every row gets the cost ``w·d²(x, C)`` and
    the priority ``t = l·w·d²(x, C) / u``, ``u`` a uniform number hashed from the round's
    seed and the row's *global* index. The row is chosen in the round iff ``t > ψ``,
    ``ψ`` the total cost of all rows, i.e. with probability ``min(1, l·w·d²/ψ)`` as in
    Bahmani et al. Since ``ψ`` is only known after the merge, each chunk keeps its
    ``capacity`` highest priorities and the merge keeps the highest of the union (ties
    by row), so the chosen rows are the same whatever the chunking or merge order, as
    long as fewer than ``capacity`` rows are chosen (``truncated`` says when not).
    Rows of zero weight or zero distance have priority 0 and are never kept.

    Attributes
    ----------
    keys : (m,) priorities, descending.  rows : (m,) global row indices.
    points : (m, d) the rows (float64).  weights : (m,) their sample weights.
    cost : ``Σ w·d²(x, C)`` over all rows merged.  count : rows merged (unweighted).
    """

    capacity: int
    keys: F64
    rows: I64
    points: F64
    weights: F64
    cost: float
    count: int

    @classmethod
    def empty(cls, capacity: int, n_features: int) -> CandidateSample:
        return cls(
            capacity,
            np.empty(0),
            np.empty(0, np.int64),
            np.empty((0, n_features)),
            np.empty(0),
            0.0,
            0,
        )

    @classmethod
    def from_chunk(
        cls,
        capacity: int,
        X: NDArray[Any],
        weights: NDArray[Any],
        sq_dist: NDArray[Any],
        oversampling: float,
        row_offset: int,
        seed: int,
    ) -> CandidateSample:
        """A chunk's cost and top priorities; ``sq_dist`` are the rows' ``d²(x, C)``."""
        w = np.asarray(weights, np.float64)
        cost_rows = w * np.asarray(sq_dist, np.float64)
        keep = np.flatnonzero(cost_rows > 0)
        rows = np.arange(row_offset, row_offset + X.shape[0], dtype=np.int64)[keep]
        keys = oversampling * cost_rows[keep] / uniform_from_rows(rows, seed)
        top = _top_m(keys, rows, capacity)
        keep = keep[top]
        return cls(
            capacity,
            keys[top],
            rows[top],
            np.asarray(X[keep], np.float64),
            w[keep],
            float(cost_rows.sum()),
            int(X.shape[0]),
        )

    def merge(self, other: CandidateSample) -> CandidateSample:
        if other.capacity != self.capacity:
            raise ValueError("cannot merge CandidateSamples of different capacities")
        keys = np.concatenate([self.keys, other.keys])
        rows = np.concatenate([self.rows, other.rows])
        order = _top_order(keys, rows)[: self.capacity]
        return _merged(
            CandidateSample,
            self._sums().merge(other._sums()),
            capacity=self.capacity,
            keys=keys[order],
            rows=rows[order],
            points=np.concatenate([self.points, other.points])[order],
            weights=np.concatenate([self.weights, other.weights])[order],
            count=self.count + other.count,
        )

    def _sums(self) -> ExactSum:
        exact: ExactSum | None = self.__dict__.get("_exact")
        return ExactSum.of(self.cost) if exact is None else exact

    def _round(self) -> None:
        _set(self, cost=float(self.__dict__["_exact"].to_float()))

    def chosen(self) -> NDArray[np.bool_]:
        """Which kept rows the round chooses: priority above the total cost."""
        return np.asarray(self.keys > self.cost)

    @property
    def truncated(self) -> bool:
        """True when more rows were chosen than ``capacity`` could keep."""
        return bool(self.keys.size == self.capacity and self.capacity and self.keys[-1] > self.cost)


_rounded_fields(CandidateSample, ("cost",))
