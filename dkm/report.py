"""The run report of a clustering job: convergence, sizes and a PCA projection as PNGs + HTML."""

from __future__ import annotations

import html
import math
import numbers
import os
import pathlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml
from matplotlib import colormaps, patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse
from matplotlib.ticker import Formatter, FuncFormatter, MaxNLocator
from numpy.typing import NDArray

from dkm import covariance
from dkm._typing import MODES, check_choice, parse_criterion

__all__ = ["write_report"]

F64 = NDArray[np.float64]

HISTORY_KEYS = ("iteration", "objective", "change", "seconds")
#: Size (inches) and resolution of every image.
FIGSIZE = (7.0, 5.0)
DPI = 100
#: History rows shown in the HTML before the middle is elided.
HISTORY_ROWS = 20
#: Clusters per colour cycle; each further cycle changes the marker.
_CYCLE = 20
_MARKERS = ("o", "s", "^", "D")
_MARKER_NAMES = ("circles", "squares", "triangles", "diamonds")
#: tab20 with its dark shades first: k <= 10 gets tab10, k <= 20 adds the light shades.
_TAB20_ORDER = (*range(0, 20, 2), *range(1, 20, 2))
#: Half-height of the jitter band that stands in for a second axis when d == 1.
_JITTER = 0.5


# --------------------------------------------------------------------------- public


#: Serialises figure making and rendering across threads (see :func:`write_report`).
_MATPLOTLIB = threading.Lock()


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    title: str,
    mode: str,
    covariance_type: str,
    history: list[dict[str, float]],
    objective: float,
    sample: NDArray[Any],
    sample_labels: NDArray[Any],
    means: NDArray[Any],
    weights: NDArray[Any],
    covariances: NDArray[Any] | None,
    cluster_sizes: NDArray[Any],
    summary: dict[str, object],
    selection: Sequence[Mapping[str, Any]] | None = None,
    criterion: str = "bic",
    config: Mapping[str, Any] | None = None,
) -> list[pathlib.Path]:
    """Write the report of a fitted clustering into ``out_dir`` (which must exist).

    Parameters
    ----------
    out_dir : existing directory; ``convergence.png``, ``sizes.png``, ``projection.png``
        and ``index.html`` are written (overwritten) there.
    title : one line shown on top of the page, e.g. ``"kmeans, k=16, 400,000 x 8"``.
    mode : ``"kmeans"`` or ``"gmm"``.
    covariance_type : ``"identity"`` for k-means; for a mixture one of full, tied, diag,
        spherical, identity.
    history : one dict per iteration with keys iteration, objective, change, seconds.
        The objective is the inertia (k-means) or the mean log-likelihood (gmm), under
        the parameters the iteration started from.
    objective : the fitted model's final objective, as in ``summary.json``: k-means the
        inertia under the final centres (``inertia_``), gmm the last lower bound
        (``lower_bound_``, the history's last objective).
    sample : (m, d) a uniform sample of the data, m may be 0.
    sample_labels : (m,) integer cluster of each sample point, in ``[0, k)``.
    means : (k, d) cluster centres / component means.
    weights : (k,) mixing weights (k-means: the fraction of points per cluster).
    covariances : scikit-learn's shapes: full (k, d, d), tied (d, d), diag (k, d),
        spherical (k,); identity: None or (k,); None for k-means.
    cluster_sizes : (k,) points (or total weight) per cluster over the whole data.
    summary : key facts listed in a table at the top of the page.
    selection : when k was chosen among candidates, one dict per candidate with keys
        n_clusters, bic, aic, log_likelihood, n_parameters, n_iter, converged: adds
        ``criterion.png`` (``criterion`` against k, the chosen k marked) and a table.
    criterion : ``"bic"`` or ``"aic"``, the one that chose k.
    config : the job's config, shown as YAML at the end of the page.

    Returns
    -------
    The paths written: the images, then ``index.html``.

    Raises
    ------
    ValueError if an argument has the wrong shape, type or values.
    """
    inputs = _validate(
        title=title,
        mode=mode,
        covariance_type=covariance_type,
        history=history,
        objective=objective,
        sample=sample,
        sample_labels=sample_labels,
        means=means,
        weights=weights,
        covariances=covariances,
        cluster_sizes=cluster_sizes,
        summary=summary,
    )
    out = pathlib.Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} is not an existing directory")
    if selection is not None:
        parse_criterion(criterion)
        if not selection:
            raise ValueError("selection: expected at least one candidate")
    written = []
    # matplotlib is not thread-safe: FreeType font objects are shared between figures,
    # and two threads laying out text at once fail ("FT_Load_Glyph … invalid outline")
    with _MATPLOTLIB:
        images = {
            "convergence.png": _convergence_figure(inputs),
            "sizes.png": _sizes_figure(inputs),
            "projection.png": _projection_figure(inputs),
        }
        if selection is not None:
            images["criterion.png"] = _criterion_figure(selection, criterion, inputs.k)
        for name, fig in images.items():
            path = out / name
            FigureCanvasAgg(fig).print_png(path)
            written.append(path)
    index = out / "index.html"
    index.write_text(_html(inputs, list(images), selection, criterion, config), encoding="utf-8")
    written.append(index)
    return written


# ------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class _Inputs:
    """The validated arguments of `write_report`, as float64/int64 arrays."""

    title: str
    mode: str
    covariance_type: str
    iteration: NDArray[np.int64]  # (t,)
    objective: F64  # (t,)
    change: F64  # (t,)
    seconds: F64  # (t,)
    final: float  # the fitted model's objective
    sample: F64  # (m, d)
    sample_labels: NDArray[np.int64]  # (m,)
    means: F64  # (k, d)
    weights: F64  # (k,)
    covariances: F64 | None  # (k, d, d) full form, None for k-means
    cluster_sizes: F64  # (k,)
    summary: dict[str, object]

    @property
    def k(self) -> int:
        return int(self.means.shape[0])

    @property
    def d(self) -> int:
        return int(self.means.shape[1])


def _as_float(name: str, value: object, ndim: int) -> F64:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a numeric array, got {type(value).__name__}") from e
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _expect_shape(name: str, arr: NDArray[Any], shape: tuple[int, ...], what: str) -> None:
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} ({what}), got {arr.shape}")


def _validate(
    *,
    title: str,
    mode: str,
    covariance_type: str,
    history: Sequence[Mapping[str, float]],
    objective: float,
    sample: NDArray[Any],
    sample_labels: NDArray[Any],
    means: NDArray[Any],
    weights: NDArray[Any],
    covariances: NDArray[Any] | None,
    cluster_sizes: NDArray[Any],
    summary: Mapping[str, object],
) -> _Inputs:
    if not isinstance(title, str):
        raise ValueError(f"title: expected a str, got {type(title).__name__}")
    check_choice("mode", mode, MODES)
    kind = covariance.of(covariance_type)
    if mode == "kmeans" and not kind.unit:
        raise ValueError(f"covariance_type: k-means has 'identity', got {covariance_type!r}")
    if not isinstance(summary, Mapping):
        raise ValueError(f"summary: expected a dict, got {type(summary).__name__}")

    mu = _as_float("means", means, 2)
    k, d = mu.shape
    if k < 1 or d < 1:
        raise ValueError(f"means: expected shape (k, d) with k, d >= 1, got {mu.shape}")
    x = _as_float("sample", sample, np.ndim(sample))
    if x.size == 0:
        x = x.reshape(0, d)  # an empty sample of any shape
    elif x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"sample: expected shape (m, {d}) (d from means), got {x.shape}")
    m = x.shape[0]

    raw_labels = np.asarray(sample_labels)
    if raw_labels.size == 0:
        raw_labels = raw_labels.astype(np.int64)
    if raw_labels.dtype.kind not in "iu":
        raise ValueError(f"sample_labels: expected integers, got dtype {raw_labels.dtype}")
    labels = raw_labels.astype(np.int64)
    _expect_shape("sample_labels", labels, (m,), "one label per sample point")
    if m and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(
            f"sample_labels: expected values in [0, {k}), got [{labels.min()}, {labels.max()}]"
        )

    w = _as_float("weights", weights, 1)
    _expect_shape("weights", w, (k,), "one per cluster")
    sizes = _as_float("cluster_sizes", cluster_sizes, 1)
    _expect_shape("cluster_sizes", sizes, (k,), "one per cluster")
    for name, arr in (("weights", w), ("cluster_sizes", sizes)):
        if np.any(arr < 0):
            raise ValueError(f"{name}: expected non-negative values")

    cov: F64 | None = None
    if mode == "kmeans":
        if covariances is not None:
            raise ValueError("covariances: k-means has none, pass None")
    elif covariances is None:
        if not kind.unit:
            raise ValueError(f"covariances: required for covariance_type {covariance_type!r}")
        cov = np.broadcast_to(np.eye(d), (k, d, d)).copy()  # unit covariances
    else:
        shape = kind.precision_shape(k, d)
        c = _as_float("covariances", covariances, np.ndim(covariances))
        _expect_shape("covariances", c, shape, f"covariance_type {covariance_type!r}")
        cov = kind.as_full(c, k, d)

    if isinstance(history, Mapping) or not isinstance(history, Sequence):
        raise ValueError(f"history: expected a list of dicts, got {type(history).__name__}")
    columns: dict[str, list[float]] = {key: [] for key in HISTORY_KEYS}
    for i, row in enumerate(history):
        if not isinstance(row, Mapping):
            raise ValueError(f"history[{i}]: expected a dict, got {type(row).__name__}")
        missing = [key for key in HISTORY_KEYS if key not in row]
        if missing:
            raise ValueError(f"history[{i}]: missing key(s) {', '.join(missing)}")
        for key in HISTORY_KEYS:
            try:
                columns[key].append(float(row[key]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"history[{i}][{key!r}]: expected a number") from e

    if isinstance(objective, bool) or not isinstance(objective, numbers.Real):
        raise ValueError(f"objective: expected a number, got {type(objective).__name__}")

    return _Inputs(
        title=title,
        mode=mode,
        covariance_type=covariance_type,
        iteration=np.asarray(columns["iteration"], dtype=np.int64),
        objective=np.asarray(columns["objective"], dtype=np.float64),
        change=np.asarray(columns["change"], dtype=np.float64),
        seconds=np.asarray(columns["seconds"], dtype=np.float64),
        final=float(objective),
        sample=x,
        sample_labels=labels,
        means=mu,
        weights=w,
        covariances=cov,
        cluster_sizes=sizes,
        summary=dict(summary),
    )


# ----------------------------------------------------------------------------- maths


@dataclass(frozen=True)
class _Pca:
    """Principal axes of a point cloud; ``components`` are orthonormal columns."""

    centre: F64  # (d,)
    components: F64  # (d, q), q = min(2, d)
    explained: F64  # (q,) fraction of the variance along each axis; NaN if there is none

    def project(self, x: F64) -> F64:
        """(n, d) -> (n, q) coordinates in the principal plane."""
        return np.asarray((x - self.centre) @ self.components, dtype=np.float64)


def _pca(x: F64) -> _Pca:
    """The top two principal axes of ``x`` (n, d), n >= 1, by SVD of the centred points.

    A sample of rank < 2 (e.g. constant) still gets two orthonormal axes: the missing
    ones are completed from the coordinate axes by QR. Signs are fixed so that the largest
    loading of each axis is positive, which makes the picture deterministic.
    """
    n, d = x.shape
    q = min(2, d)
    centre = x.mean(axis=0)
    xc = x - centre
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    tol = s[0] * max(n, d) * np.finfo(np.float64).eps if s.size else 0.0
    rank = int(np.count_nonzero(s > tol)) if s.size and s[0] > 0 else 0
    basis = vt[: min(rank, q)].T
    if basis.shape[1] < q:
        # The first r columns of Q span `basis`; the next ones complete it orthonormally.
        qmat, _ = np.linalg.qr(np.hstack([basis, np.eye(d)]))
        basis = qmat[:, :q]
    big = np.argmax(np.abs(basis), axis=0)
    basis = basis * np.sign(basis[big, np.arange(q)])
    total = float(np.sum(s**2))
    var = np.sum((xc @ basis) ** 2, axis=0)
    explained = var / total if total > 0 else np.full(q, np.nan)
    return _Pca(centre, np.ascontiguousarray(basis), np.asarray(explained, dtype=np.float64))


def _project_covariances(covariances: F64, components: F64) -> F64:
    """(k, d, d) covariances -> (k, q, q) covariances of the projection, Vᵀ Σ V.

    ``components`` V is (d, q) with orthonormal columns; a Gaussian N(μ, Σ) projects to
    N(Vᵀ(μ - c), Vᵀ Σ V) in the principal plane, whatever the centre c.
    """
    return np.asarray(components.T @ covariances @ components, dtype=np.float64)


def _ellipse_axes(cov2: F64) -> tuple[float, float, float]:
    """Width, height (the 1-sigma diameters) and angle in degrees of a 2×2 covariance."""
    vals, vecs = np.linalg.eigh(cov2)  # ascending
    vals = np.clip(vals, 0.0, None)
    major = vecs[:, 1]
    angle = math.degrees(math.atan2(major[1], major[0]))
    return 2.0 * math.sqrt(vals[1]), 2.0 * math.sqrt(vals[0]), angle


# ---------------------------------------------------------------------------- style


def _colours(k: int) -> F64:
    """(k, 4) RGBA per cluster: tab20 (dark shades first), cycling every 20 clusters."""
    table = np.asarray(colormaps["tab20"](np.array(_TAB20_ORDER)), dtype=np.float64)
    return table[np.arange(k) % _CYCLE]


def _marker_group(j: NDArray[np.int64] | int) -> Any:
    return (np.asarray(j) // _CYCLE) % len(_MARKERS)


def _figure() -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _note(ax: Axes, text: str, y: float = 0.5) -> None:
    """A boxed grey note on the axes, at height ``y`` (axes fraction)."""
    ax.text(
        0.5,
        y,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center" if y == 0.5 else "top",
        fontsize=11,
        color="0.35",
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7", "alpha": 0.9},
        zorder=10,
    )


def _amount(value: float) -> str:
    """A count or total weight in full with thousands separators: 2,000,000; 1,234.5."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:,.6g}"


class _InFull(Formatter):
    """Tick labels in full with thousands separators and as many decimals as the ticks
    need: 22,368,200 where the default writes 2.23682 and an offset 1e7."""

    decimals = 0

    def set_locs(self, locs: list[float]) -> None:
        super().set_locs(locs)
        values = np.asarray(locs, dtype=np.float64)
        values = values[np.isfinite(values)]
        step = float(np.min(np.diff(values))) if values.size > 1 else 0.0
        for self.decimals in range(13):
            if step <= 0 or np.all(np.abs(np.round(values, self.decimals) - values) < 1e-6 * step):
                break

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:,.{self.decimals}f}"


def _objective_name(mode: str) -> str:
    return "inertia" if mode == "kmeans" else "mean log-likelihood"


# ---------------------------------------------------------------------- convergence


def _improvements(r: _Inputs) -> tuple[NDArray[np.int64], F64]:
    """The iterations whose improvement of the objective is known, and that improvement.

    A history entry holds the objective under the parameters its iteration started
    from, so an iteration's improvement is the next entry's change (a fall of the
    inertia, a rise of the likelihood). The final inertia is under the final centres, so
    it gives the last iteration's improvement too; a mixture's final objective is its last
    entry, which leaves the last iteration's improvement unknown.
    """
    if r.mode == "kmeans":
        values, known = np.append(r.objective, r.final), r.iteration
    else:
        values, known = r.objective, r.iteration[:-1]
    with np.errstate(invalid="ignore"):  # inf - inf from a non-finite objective
        step = np.diff(values)
    gain = -step if r.mode == "kmeans" else step
    ok = np.isfinite(gain)
    return known[ok], gain[ok]


def _convergence_figure(r: _Inputs) -> Figure:
    fig = _figure()
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1.0))
    name = _objective_name(r.mode)
    change = "fall" if r.mode == "kmeans" else "rise"
    fig.suptitle(f"Convergence: how much each iteration improved the {name}", fontsize=12)
    top.set_ylabel(f"{change} of the {name}\n(log scale)")
    top.set_title(f"final {name}: {r.final:.8g}", fontsize=9, loc="right", color="C0")
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("iteration")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if r.iteration.size == 0:
        _note(top, "no iterations were run (max_iter = 0)")
        bottom.set_yticks([])
        return fig

    it, gain = _improvements(r)
    dot = 3.5 if it.size <= 60 else 2.0
    up, down, flat = gain > 0, gain < 0, gain == 0
    if up.any() or down.any():
        top.set_yscale("log")
        # the size of every change on one line; the markers say which way it went
        top.plot(it[~flat], np.abs(gain[~flat]), color="C0", linewidth=1.2, alpha=0.5)
        top.plot(it[up], gain[up], "o", color="C0", markersize=dot, label="improved by")
        if down.any():
            top.plot(it[down], -gain[down], "v", color="C3", markersize=6, label="got worse by")
    if flat.any():
        # zero has no place on a log scale: on the bottom edge
        top.plot(
            it[flat],
            np.zeros(int(flat.sum())),
            "o",
            markerfacecolor="white",
            color="C0",
            markersize=5,
            transform=top.get_xaxis_transform(),
            clip_on=False,
            label="no change",
        )
    if not (up.any() or down.any()):
        top.set_yticks([])
        _note(
            top,
            f"the {name} did not change"
            if flat.any()
            else "no change between iterations to show (one iteration, or non-finite values)",
        )
    if down.any() or flat.any():
        top.legend(loc="upper right", fontsize=8)
    if r.mode == "gmm":
        # the improvements fall, so the lower left corner is empty
        top.text(
            0.02,
            0.04,
            f"iteration {r.iteration[-1]}: its rise is not known (one more E-step would tell)",
            transform=top.transAxes,
            fontsize=8,
            color="0.4",
        )

    secs = np.where(np.isfinite(r.seconds), r.seconds, 0.0)
    it_all = r.iteration
    bottom.bar(it_all, secs, width=0.8 if it_all.size > 1 else 0.5, color="C1", alpha=0.85)
    bottom.set_xlim(it_all.min() - 0.6, it_all.max() + 0.6)
    bottom.set_title(
        f"{secs.sum():.3g} s in {it_all.size} iteration{'s' if it_all.size != 1 else ''}, "
        f"median {np.median(secs):.3g} s",
        fontsize=9,
        loc="right",
    )
    return fig


# ------------------------------------------------------------------------ choosing k


def _criterion_figure(
    selection: Sequence[Mapping[str, Any]], criterion: str, chosen: int
) -> Figure:
    """BIC and AIC against k, one panel each: they differ by a penalty far smaller than
    either's range, so on one scale the curves hide each other."""
    fig = _figure()
    rows = sorted(selection, key=lambda c: c["n_clusters"])
    ks = np.array([c["n_clusters"] for c in rows])
    order = (criterion, "aic" if criterion == "bic" else "bic")  # the one that chose k on top
    axes = fig.subplots(2, 1, sharex=True)
    for ax, name, colour in zip(axes, order, ("C0", "C2"), strict=True):
        values = np.array([c[name] for c in rows], dtype=np.float64)
        main = name == criterion
        ax.plot(ks, values, marker="o", color=colour, linewidth=1.8 if main else 1.2)
        ax.set_ylabel(f"{name.upper()}\n(lower is better)")
        # in full: an offset ("1e7 + ...") over a range small next to the values is unreadable
        ax.yaxis.set_major_formatter(_InFull())
        ax.grid(True, alpha=0.3)
        ok = np.isfinite(values)
        if ok.any():
            low = int(np.flatnonzero(ok)[np.argmin(values[ok])])
            ax.set_title(
                f"{name.upper()}" + (" (chose k)" if main else "") + f": lowest at k = {ks[low]}",
                fontsize=9,
                loc="right",
            )
        if main and chosen in ks:
            best = values[int(np.flatnonzero(ks == chosen)[0])]
            ax.plot([chosen], [best], "o", markersize=11, markerfacecolor="none", color="C3")
            ax.annotate(
                f"k = {chosen}",
                (chosen, best),
                textcoords="offset points",
                xytext=(0, 12),
                ha="center",
                color="C3",
            )
            ax.margins(y=0.2)  # room for the label above the lowest point
    axes[-1].set_xlabel("number of clusters k")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(
        f"Choosing k by {criterion.upper()}: {order[0].upper()} and {order[1].upper()} of "
        "each candidate",
        fontsize=12,
    )
    return fig


# ---------------------------------------------------------------------------- sizes


def _sizes_figure(r: _Inputs) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    k = r.k
    idx = np.arange(k)
    sizes = r.cluster_sizes
    total = float(sizes.sum())
    ax.bar(idx, sizes, width=0.8, color=_colours(k), edgecolor="0.25", linewidth=0.4)
    ax.axhline(total / k, color="0.4", linestyle="--", linewidth=0.9, label="equal split")
    ax.set_xlabel("cluster" if r.mode == "kmeans" else "component")
    ax.set_ylabel("points (or total weight)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _amount(v)))
    ax.set_title(f"Cluster sizes over the whole data ({_amount(total)} in all)", fontsize=12)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_xlim(-0.6, k - 0.4)
    if k <= 32:
        ax.set_xticks(idx)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(axis="x", labelsize=9 if k <= 20 else 7)
    top = float(sizes.max()) if k and sizes.max() > 0 else 1.0
    ymax = top * (1.22 if r.mode == "gmm" else 1.08)
    ax.set_ylim(0, ymax)

    upright = k <= 12
    fontsize = 9 if k <= 12 else (7 if k <= 32 else 5.5)
    for j in range(k):
        if sizes[j] == 0:
            ax.text(
                j,
                0.01 * ymax,
                "empty",
                ha="center",
                va="bottom",
                rotation=0 if upright else 90,
                fontsize=fontsize,
                color="C3",
            )
        elif r.mode == "gmm":
            ax.text(
                j,
                sizes[j] + 0.01 * ymax,
                f"{r.weights[j]:.3f}",
                ha="center",
                va="bottom",
                rotation=0 if upright else 90,
                fontsize=fontsize,
                # hides the equal-split line behind the number
                bbox={"boxstyle": "square,pad=0.05", "facecolor": "white", "lw": 0},
            )
    handles, labels = ax.get_legend_handles_labels()
    if r.mode == "gmm":
        handles.append(Line2D([], [], linestyle="none", marker="$w$", color="black"))
        labels.append("w: mixing weight (above each bar)")
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=8)
    return fig


# ----------------------------------------------------------------------- projection


def _projection_figure(r: _Inputs) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    k, d = r.k, r.d
    x, labels = r.sample, r.sample_labels
    m = x.shape[0]
    # With no sample, the means define the plane so that they can still be drawn.
    pca = _pca(x if m else r.means)
    colours = _colours(k)

    xy = pca.project(x)
    mu = pca.project(r.means)
    if d == 1:
        # One feature: spread the points over a jittered, meaningless second axis.
        rng = np.random.default_rng(0)
        xy = np.column_stack([xy[:, 0], rng.uniform(-_JITTER, _JITTER, m)])
        mu = np.column_stack([mu[:, 0], np.zeros(k)])

    size = float(np.clip(3e4 / max(m, 1), 3.0, 16.0))
    alpha = float(np.clip(30.0 / math.sqrt(max(m, 1)), 0.25, 0.85))
    groups = _marker_group(labels)
    for g in np.unique(groups):
        sel = groups == g
        ax.scatter(
            xy[sel, 0],
            xy[sel, 1],
            s=size,
            c=colours[labels[sel]],
            marker=_MARKERS[int(g)],
            alpha=alpha,
            linewidths=0,
            rasterized=True,
            zorder=1,
        )

    if r.covariances is not None:
        cov2 = _project_covariances(r.covariances, pca.components)
        # Darker than the points and haloed in white, so they show on top of their cloud.
        edge = colours * np.array([0.55, 0.55, 0.55, 1.0])
        halo = [patheffects.withStroke(linewidth=3.2, foreground="white", alpha=0.7)]
        for j in range(k):
            if d == 1:
                # Only the width means something; the heights fill the jitter band.
                w1, h1, angle = 2.0 * math.sqrt(max(cov2[j, 0, 0], 0.0)), _JITTER, 0.0
            else:
                w1, h1, angle = _ellipse_axes(cov2[j])
            for n_sigma, style, lw in ((1, "-", 1.6), (2, "--", 1.1)):
                ax.add_patch(
                    Ellipse(
                        (mu[j, 0], mu[j, 1]),
                        n_sigma * w1,
                        n_sigma * h1,
                        angle=angle,
                        fill=False,
                        edgecolor=edge[j],
                        linestyle=style,
                        linewidth=lw,
                        path_effects=halo,
                        zorder=3,
                    )
                )

    marker_area = 110.0 if k <= 20 else 70.0
    ax.scatter(
        mu[:, 0],
        mu[:, 1],
        s=marker_area,
        c=colours,
        marker="X",
        edgecolors="black",
        linewidths=0.9,
        zorder=4,
    )

    ex = pca.explained
    axis_names = [
        f"PC{i + 1}" + (f" ({100 * ex[i]:.1f}% of variance)" if np.isfinite(ex[i]) else "")
        for i in range(ex.size)
    ]
    ax.set_xlabel(axis_names[0] if d > 1 else "feature (centred)")
    if d == 1:
        ax.set_ylabel("jitter (no meaning)")
        ax.set_ylim(-2.2 * _JITTER, 2.2 * _JITTER)
        ax.set_yticks([])
    else:
        ax.set_ylabel(axis_names[1])
        ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.25)
    ax.set_title(
        f"PCA projection of a {m:,}-point sample, coloured by cluster"
        if m
        else "PCA projection of the means (the sample is empty)",
        fontsize=12,
    )
    if m == 0:
        _note(ax, "no sample points (m = 0): only the means are drawn", y=0.97)
    elif not np.any(np.isfinite(ex)) or np.all(ex == 0):
        _note(ax, "the sample has no variance: the axes are arbitrary", y=0.97)

    handles: list[Any] = [
        Line2D(
            [],
            [],
            linestyle="none",
            marker="X",
            markersize=9,
            markerfacecolor="0.6",
            markeredgecolor="black",
            label="projected mean (index)",
        )
    ]
    if r.covariances is not None:
        handles += [
            Line2D([], [], color="0.3", linewidth=1.6, label="1σ"),
            Line2D([], [], color="0.3", linewidth=1.1, linestyle="--", label="2σ"),
        ]
    if k > _CYCLE:
        cycles = -(-k // _CYCLE)
        for g in range(min(len(_MARKERS), cycles)):
            groups_g = [c for c in range(g, cycles, len(_MARKERS))]
            spans = ", ".join(f"{c * _CYCLE}–{min(k, (c + 1) * _CYCLE) - 1}" for c in groups_g)
            handles.append(
                Line2D([], [], linestyle="none", marker=_MARKERS[g], color="0.4", label=spans)
            )
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8)
    _label_means(fig, ax, mu, marker_area, colours)
    return fig


#: A box in display pixels: x0, y0, x1, y1.
_Box = tuple[float, float, float, float]


def _intersection(a: _Box, b: _Box) -> float:
    """Area of the intersection of two boxes."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


#: Where a mean's index may go, as unit offsets from the mean: upper right first.
_LABEL_SPOTS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))


def _label_means(fig: Figure, ax: Axes, mu: F64, marker_area: float, colours: F64) -> None:
    """Write each mean's index next to its X, avoiding the other X's and labels.

    Greedy: the most crowded means choose first, each taking the spot (of eight around
    it) whose box overlaps least with the markers, the labels placed so far and the
    outside of the axes. Works in display pixels, so the layout is resolved first.
    """
    k = mu.shape[0]
    fontsize = 8.0 if k <= 20 else 6.5
    fig.draw_without_rendering()  # final limits, aspect and layout -> final transData
    px = fig.dpi / 72.0
    at = ax.transData.transform(mu)
    half = (math.sqrt(marker_area) / 2 + 1.0) * px
    boxes: list[_Box] = [(x - half, y - half, x + half, y + half) for x, y in at]
    frame = ax.get_window_extent()
    frame_box = (frame.x0, frame.y0, frame.x1, frame.y1)
    gap = 1.5  # points from the marker's edge to the label
    crowd = np.zeros(k)
    if k > 1:
        dist = np.hypot(*(at[:, None, :] - at[None, :, :]).transpose(2, 0, 1))
        crowd = np.sum(dist < 40 * px, axis=1)

    def cost(b: _Box) -> float:
        area = sum(_intersection(b, o) for o in boxes)
        outside = (b[2] - b[0]) * (b[3] - b[1]) - _intersection(b, frame_box)
        return area + 4.0 * outside

    for j in np.argsort(-crowd, kind="stable"):
        text = str(int(j))
        w = (0.62 * fontsize * len(text) + 3.0) * px  # text + the bbox padding
        h = (1.15 * fontsize + 3.0) * px
        best: tuple[float, int, int, _Box] | None = None
        for dx, dy in _LABEL_SPOTS:
            ox, oy = at[j, 0] + dx * (half + gap * px), at[j, 1] + dy * (half + gap * px)
            x0 = ox if dx > 0 else (ox - w if dx < 0 else ox - w / 2)
            y0 = oy if dy > 0 else (oy - h if dy < 0 else oy - h / 2)
            box = (x0, y0, x0 + w, y0 + h)
            score = cost(box)
            if best is None or score < best[0] - 1e-9:
                best = (score, dx, dy, box)
        assert best is not None
        _, dx, dy, box = best
        boxes.append(box)
        offset = half / px + gap
        ax.annotate(
            text,
            (mu[j, 0], mu[j, 1]),
            xytext=(dx * offset, dy * offset),
            textcoords="offset points",
            ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
            va="bottom" if dy > 0 else ("top" if dy < 0 else "center"),
            fontsize=fontsize,
            fontweight="bold",
            bbox={
                "boxstyle": "round,pad=0.15",
                "facecolor": (1.0, 1.0, 1.0, 0.8),
                "edgecolor": colours[j],
                "linewidth": 1.0,
            },
            zorder=5,
        )


# ----------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
p.sub { color: #666; margin-top: 0; }
tr.chosen td { font-weight: bold; background: #fff3e0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.9em; margin-top: 0.3em; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: 0.6em; font-size: 0.85em; }
"""


def _fmt(value: object) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return f"{float(value):.8g}"
    return str(value)


def _captions(r: _Inputs) -> dict[str, str]:
    name = _objective_name(r.mode)
    conv = (
        f"How much each iteration improved the {name} (top, log scale) and the wall-clock "
        f"seconds it took (bottom). The final {name} is the fitted model's, as in the summary."
    )
    if r.mode == "kmeans":
        conv += (
            " The history's inertia is under the centres each iteration started from; the "
            "last iteration's improvement is measured against the final inertia."
        )
    else:
        conv += (
            " The final value is the lower bound of the last iteration, so that iteration's "
            "improvement is not known."
        )
    sizes = "Points (or total sample weight) per cluster over the whole data; dashed: equal split."
    if r.mode == "gmm":
        sizes += " The number above each bar is the component's mixing weight."
    proj = (
        "The sample projected on its two principal axes, coloured by cluster; "
        "X marks each projected mean with its index."
    )
    if r.d == 1:
        proj = (
            "The sample along its single feature (centred), spread over a random vertical "
            "jitter, coloured by cluster; X marks each mean with its index."
        )
    if r.covariances is not None:
        proj += (
            " Ellipses: 1σ (solid) and 2σ (dashed) contours of each component's Gaussian "
            "projected on the plane (Vᵀ Σ V)."
        )
    if r.k > _CYCLE:
        proj += (
            f" Colours repeat every {_CYCLE} clusters; the marker shape "
            f"({', '.join(_MARKER_NAMES)}) tells the cycles apart."
        )
    crit = (
        "BIC and AIC of every candidate number of clusters, all fitted in shared passes, "
        "each on its own scale; the circled point is the chosen k."
    )
    return {
        "convergence.png": conv,
        "sizes.png": sizes,
        "projection.png": proj,
        "criterion.png": crit,
    }


def _history_rows(r: _Inputs) -> list[str]:
    t = r.iteration.size
    if t <= HISTORY_ROWS:
        shown: list[int | None] = list(range(t))
    else:
        half = HISTORY_ROWS // 2
        shown = [*range(half), None, *range(t - half, t)]
    rows = []
    for i in shown:
        if i is None:
            rows.append(
                f'<tr><td colspan="4">… {t - HISTORY_ROWS} iterations not shown …</td></tr>'
            )
            continue
        cells = (
            f"{r.iteration[i]}",
            f"{r.objective[i]:.10g}",
            f"{r.change[i]:.4g}",
            f"{r.seconds[i]:.3f}",
        )
        rows.append(
            "<tr>" + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells) + "</tr>"
        )
    return rows


def _selection_rows(selection: Sequence[Mapping[str, Any]], chosen: int) -> list[str]:
    keys = ("n_clusters", "bic", "aic", "log_likelihood", "n_parameters", "n_iter", "converged")
    rows = ["<tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"]
    for c in selection:
        mark = ' class="chosen"' if c["n_clusters"] == chosen else ""
        cells = "".join(f'<td class="num">{html.escape(_fmt(c[k]))}</td>' for k in keys)
        rows.append(f"<tr{mark}>{cells}</tr>")
    return rows


def _html(
    r: _Inputs,
    images: list[str],
    selection: Sequence[Mapping[str, Any]] | None = None,
    criterion: str = "bic",
    config: Mapping[str, Any] | None = None,
) -> str:
    """The page: everything inline or beside it (the images), so it opens offline."""
    e = html.escape
    captions = _captions(r)
    sub = f"mode {r.mode}, covariance type {r.covariance_type}, k = {r.k}, d = {r.d}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>dkm report: {e(r.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(r.title)}</h1>",
        f'<p class="sub">{e(sub)}</p>',
        "<h2>Summary</h2>",
        "<table>",
    ]
    out += [
        f"<tr><th>{e(str(key))}</th><td>{e(_fmt(value))}</td></tr>"
        for key, value in r.summary.items()
    ]
    out.append(f"<tr><th>cluster sizes</th><td>{e(_sizes_text(r.cluster_sizes))}</td></tr>")
    out.append("</table>")
    if selection is not None:
        out += [
            "<h2>Choosing k</h2>",
            f"<p>k = {r.k} has the lowest {e(criterion.upper())} of the candidates.</p>",
            "<table>",
            *_selection_rows(selection, r.k),
            "</table>",
        ]
    headings = {
        "criterion.png": "Criterion against k",
        "convergence.png": "Convergence",
        "sizes.png": "Cluster sizes",
        "projection.png": "Projection",
    }
    for name in images:
        out += [
            f"<h2>{e(headings.get(name, name))}</h2>",
            "<figure>",
            f'<img src="{e(name, quote=True)}" alt="{e(captions[name], quote=True)}">',
            f"<figcaption>{e(captions[name])}</figcaption>",
            "</figure>",
        ]
    out += ["<h2>History</h2>"]
    if r.iteration.size == 0:
        out.append("<p>No iterations were run.</p>")
    else:
        out += [
            "<table>",
            "<tr>" + "".join(f"<th>{e(h)}</th>" for h in HISTORY_KEYS) + "</tr>",
            *_history_rows(r),
            "</table>",
        ]
    if config is not None:
        text = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
        out += ["<h2>Config</h2>", f"<pre>{e(text)}</pre>"]
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


#: Cluster sizes the summary lists one by one; more are summarised (sizes.png has all).
LISTED_SIZES = 32


def _sizes_text(sizes: F64) -> str:
    """The cluster sizes in cluster order, or their range when there are many."""

    def fmt(x: float) -> str:  # counts as counts; weighted sizes in eight digits
        return f"{x:,.0f}" if float(x).is_integer() else f"{x:.8g}"

    if sizes.size <= LISTED_SIZES:
        return ", ".join(fmt(x) for x in sizes)
    return (
        f"{sizes.size:,} clusters: smallest {fmt(sizes.min())}, median "
        f"{fmt(float(np.median(sizes)))}, largest {fmt(sizes.max())} (see the figure)"
    )
