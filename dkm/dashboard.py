"""The ``dkm`` page of the Dask dashboard: every job reporting to the scheduler, live.

A job publishes its progress as events on its scheduler (:data:`dkm.monitor.EVENT_TOPIC`);
a scheduler plugin (:class:`JobBoard`) keeps the state of each job from them, and a Bokeh
page of the scheduler's own dashboard (``/dkm``, listed in its navigation) shows it,
updated twice a second: the objective and its relative change per iteration, one line
per model, the cluster sizes, the centres' movement and (k-means) the share of rows the
bounds skipped, and the job's facts and state. A job that ended stays on the page until
the scheduler stops.

On a scheduler dkm starts itself (``cluster.kind`` local, slurm, pbs, sge, lsf) this
module is a preload of it; on a standing scheduler::

    dask scheduler --preload dkm.dashboard

Importing the module adds the page to distributed's dashboard applications (so it must
happen before the scheduler starts its dashboard, as a preload's import does);
:func:`dask_setup` installs the plugin and lists the page in the navigation.
"""

from __future__ import annotations

import html
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from distributed.diagnostics.plugin import SchedulerPlugin

from dkm.monitor import EVENT_TOPIC

logger = logging.getLogger(__name__)

#: Where the page is served, under the dashboard's prefix.
ROUTE = "/dkm"
#: Its name in the dashboard's navigation (shown title-cased: "Dkm").
PAGE = "dkm"
#: Jobs a scheduler keeps for the page; the oldest that ended are dropped first.
MAX_JOBS = 50
#: Milliseconds between the page's updates.
INTERVAL_MS = 500


@dataclass
class ModelTrace:
    """One model's iterations (restarts and a sweep over k iterate several together)."""

    iteration: list[int] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    relative_change: list[float] = field(default_factory=list)
    shift: list[float] = field(default_factory=list)
    skipped: list[float] = field(default_factory=list)
    #: the cluster sizes of its latest iteration
    sizes: list[float] = field(default_factory=list)
    n_clusters: int | None = None
    converged: bool = False


@dataclass
class JobState:
    """What the page shows of one job, from its events."""

    job: str
    started: float = field(default_factory=time.time)
    config: str | None = None
    mode: str | None = None
    n_clusters: Any = None
    n_samples: int | None = None
    n_features: int | None = None
    output: str | None = None
    state: str = "running"
    message: str = ""
    iteration: int = 0
    seconds: float | None = None
    #: the fitted model's own sizes, under its final centres (once the job is done)
    sizes: list[float] = field(default_factory=list)
    models: dict[int, ModelTrace] = field(default_factory=dict)
    chosen_k: int | None = None
    version: int = 0

    def update(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "start":
            for key in ("config", "mode", "n_clusters", "n_samples", "n_features", "output"):
                if record.get(key) is not None:
                    setattr(self, key, record[key])
        elif event == "iteration":
            self._iteration(record)
        elif event == "selected":
            if record.get("n_clusters") is not None:
                self.chosen_k = int(record["n_clusters"])
        elif event in ("done", "refused"):
            converged = record.get("converged")
            self.state = "converged" if converged or converged is None else "not converged"
            if event == "refused":
                self.state = "refused"
            self.message = str(record.get("message", ""))
            if record.get("sizes"):  # the model's own sizes, under its final centres
                self.sizes = [float(s) for s in record["sizes"]]
            if record.get("n_clusters") is not None and isinstance(self.n_clusters, list):
                self.chosen_k = int(record["n_clusters"])
            if record.get("output"):
                self.output = str(record["output"])
        elif event == "failed":
            self.state = "failed"
            self.message = str(record.get("message", ""))
        self.version += 1

    def _iteration(self, record: dict[str, Any]) -> None:
        sample = record.get("sample")
        if sample is not None:
            # the sampled schedule's iterations: said in the status line; the figures
            # are of the iterations on all the data
            self.message = (
                f"iteration {int(record['iteration'])} on a sample of {int(sample):,} rows"
            )
            self.seconds = _number(record.get("seconds"))
            self.state = "running"
            return
        if self.message.startswith("iteration "):
            self.message = ""
        model = self.models.setdefault(int(record.get("model") or 0), ModelTrace())
        model.iteration.append(int(record["iteration"]))
        model.objective.append(_number(record.get("objective")))
        model.relative_change.append(_number(record.get("relative_change")))
        model.shift.append(_number(record.get("shift")))
        model.skipped.append(_number(record.get("skipped")))
        model.converged = bool(record.get("converged"))
        sizes = record.get("sizes")
        if sizes:
            model.n_clusters = len(sizes)
            model.sizes = [float(s) for s in sizes]
        self.iteration = max(self.iteration, int(record["iteration"]))
        self.seconds = _number(record.get("seconds"))
        self.state = "running"


def _number(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


class JobBoard(SchedulerPlugin):
    """Keeps every dkm job's state on the scheduler, from the events the jobs publish."""

    name = "dkm-dashboard"

    def __init__(self) -> None:
        self.jobs: OrderedDict[str, JobState] = OrderedDict()

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != EVENT_TOPIC or not isinstance(msg, dict) or "job" not in msg:
            return
        try:
            job = self.jobs.get(msg["job"])
            if job is None:
                job = self.jobs[msg["job"]] = JobState(str(msg["job"]))
                self._forget()
            job.update(msg)
        except Exception:  # a malformed event must not disturb the scheduler
            logger.exception("dkm dashboard: cannot read the event %r", msg)

    def _forget(self) -> None:
        while len(self.jobs) > MAX_JOBS:
            ended = [k for k, j in self.jobs.items() if j.state != "running"]
            del self.jobs[ended[0] if ended else next(iter(self.jobs))]


def board(scheduler: Any) -> JobBoard:
    """The scheduler's :class:`JobBoard`, installed if it has none."""
    plugin = scheduler.plugins.get(JobBoard.name)
    if not isinstance(plugin, JobBoard):
        plugin = JobBoard()
        scheduler.add_plugin(plugin, name=JobBoard.name)
        for _, record in scheduler.get_events(EVENT_TOPIC):  # jobs before the plugin
            plugin.log_event(EVENT_TOPIC, record)
    return plugin


def output_link(path: str | None) -> str:
    """The output path as HTML: a link where it is a local or http(s) path."""
    if not path:
        return "-"
    text = html.escape(path)
    if path.startswith(("http://", "https://", "file://")):
        href = path
    elif PurePosixPath(path).is_absolute():
        href = "file://" + quote(path)
    else:
        return text
    return f'<a href="{html.escape(href)}" target="_blank">{text}</a>'


# ------------------------------------------------------------------------- the page


def _page_doc(scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    page = JobPage(board(scheduler))
    page.update()
    add_periodic_callback(doc, page, INTERVAL_MS)
    doc.title = "Dask: dkm"
    doc.add_root(page.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


class JobPage:
    """The Bokeh models of the page: a job chooser, the facts, four figures."""

    def __init__(self, jobs: JobBoard) -> None:
        from bokeh.layouts import column, row
        from bokeh.models import ColumnDataSource, Div, HoverTool, Range1d, Select
        from bokeh.plotting import figure

        self.board = jobs
        self.shown: tuple[str, int] | None = None
        #: the job the user chose; None follows the newest
        self.chosen: str | None = None
        self._following = False
        self.select = Select(title="job", options=[], width=520, name="dkm-job")
        self.select.on_change("value", self._choose)
        self.facts = Div(text="<p>No dkm job has reported to this scheduler yet.</p>")
        self.facts.name = "dkm-facts"
        self.objective_lines = ColumnDataSource(
            {"xs": [], "ys": [], "color": [], "width": [], "label": []}, name="dkm-objective-lines"
        )
        self.objective = ColumnDataSource(
            {"iteration": [], "objective": [], "model": [], "color": []}, name="dkm-objective"
        )
        self.change_lines = ColumnDataSource(
            {"xs": [], "ys": [], "color": [], "width": [], "label": []}, name="dkm-change-lines"
        )
        self.change = ColumnDataSource(
            {"iteration": [], "change": [], "color": []}, name="dkm-change"
        )
        self.converged = ColumnDataSource(
            {"iteration": [], "objective": [], "label": []}, name="dkm-converged"
        )
        self.sizes = ColumnDataSource({"rank": [], "size": [], "cluster": []}, name="dkm-sizes")
        self.movement = ColumnDataSource(
            {"iteration": [], "shift": [], "skipped": []}, name="dkm-movement"
        )
        tools = "pan,wheel_zoom,box_zoom,reset,save"

        def plot(name: str, title: str, **kw: Any) -> Any:
            return figure(
                title=title,
                height=280,
                sizing_mode="stretch_width",
                tools=tools,
                name=f"dkm-{name}-figure",
                **kw,
            )

        f_obj = plot("objective", "objective per iteration", x_axis_label="iteration")
        f_obj.multi_line("xs", "ys", color="color", line_width="width", source=self.objective_lines)
        dots = f_obj.scatter("iteration", "objective", color="color", size=6, source=self.objective)
        f_obj.add_tools(
            HoverTool(
                renderers=[dots],
                tooltips=[("", "@model"), ("iteration", "@iteration"), ("objective", "@objective")],
            )
        )
        f_obj.scatter(
            "iteration",
            "objective",
            marker="star",
            size=16,
            color="black",
            legend_field="label",
            source=self.converged,
        )
        self.converged_legend = f_obj.legend[0]
        self.converged_legend.visible = False  # an empty box until a model converges
        f_change = plot(
            "change",
            "relative change of the objective (log scale)",
            y_axis_type="log",
            x_axis_label="iteration",
        )
        f_change.multi_line(
            "xs",
            "ys",
            color="color",
            line_width="width",
            legend_field="label",
            source=self.change_lines,
        )
        f_change.scatter("iteration", "change", color="color", size=5, source=self.change)
        f_move = plot(
            "movement",
            "centres' movement: summed squared shift (log scale)",
            y_axis_type="log",
            x_axis_label="iteration",
        )
        f_move.line("iteration", "shift", source=self.movement, color="#d62728", line_width=2)
        f_move.scatter("iteration", "shift", source=self.movement, color="#d62728", size=5)
        f_skip = plot(
            "skipped",
            "k-means: share of rows whose search the bounds skipped",
            x_axis_label="iteration",
            y_range=Range1d(0, 1.02),
        )
        f_skip.line("iteration", "skipped", source=self.movement, color="#2ca02c", line_width=2)
        f_skip.scatter("iteration", "skipped", source=self.movement, color="#2ca02c", size=5)
        f_sizes = plot("sizes", "cluster sizes (sorted): the current iteration's, then the model's")
        f_sizes.xaxis.axis_label = "clusters, largest first"
        bars = f_sizes.vbar(x="rank", top="size", width=0.8, source=self.sizes, color="#1f77b4")
        f_sizes.add_tools(
            HoverTool(renderers=[bars], tooltips=[("cluster", "@cluster"), ("size", "@size")])
        )
        f_sizes.y_range.start = 0
        self.root = column(
            self.select,
            self.facts,
            row(f_obj, f_change, sizing_mode="stretch_width"),
            row(f_move, f_skip, sizing_mode="stretch_width"),
            f_sizes,
            sizing_mode="stretch_width",
        )

    def _choose(self, attr: str, old: Any, new: Any) -> None:
        if self._following:  # the page's own change, not the user's choice
            return
        self.chosen = new if new in self.board.jobs else None
        self.update()

    def update(self) -> None:
        jobs = self.board.jobs
        if not jobs:
            return
        options = [(k, f"{k} {j.config or ''} ({j.state})") for k, j in reversed(jobs.items())]
        if options != self.select.options:
            self.select.options = options
        job = jobs.get(self.chosen) if self.chosen else None
        job = job or next(reversed(jobs.values()))
        if self.select.value != job.job:
            self._following = True
            try:
                self.select.value = job.job
            finally:
                self._following = False
        if self.shown == (job.job, job.version):
            return
        self.shown = (job.job, job.version)
        self._show(job)

    def _show(self, job: JobState) -> None:
        from bokeh.palettes import Category10_10

        self.facts.text = facts_html(job)
        models = sorted(job.models.items())
        chosen = _chosen_model(job)
        xs, ys, colors, widths, labels = [], [], [], [], []
        cxs, cys, ccolors, cwidths, clabels = [], [], [], [], []
        points: dict[str, list[Any]] = {"iteration": [], "objective": [], "model": [], "color": []}
        marks: dict[str, list[Any]] = {"iteration": [], "objective": [], "label": []}
        for index, trace in models:
            color = Category10_10[index % 10]
            width = 3 if index == chosen else 1.5
            label = f"model {index}" + (f" (k={trace.n_clusters})" if trace.n_clusters else "")
            xs.append(trace.iteration)
            ys.append(trace.objective)
            colors.append(color)
            widths.append(width)
            labels.append(label)
            points["iteration"] += trace.iteration
            points["objective"] += trace.objective
            points["model"] += [label] * len(trace.iteration)
            points["color"] += [color] * len(trace.iteration)
            change = [
                (i, c) for i, c in zip(trace.iteration, trace.relative_change, strict=True) if c > 0
            ]
            cxs.append([i for i, _ in change])
            cys.append([c for _, c in change])
            ccolors.append(color)
            cwidths.append(width)
            clabels.append(label)
            if trace.converged:
                marks["iteration"].append(trace.iteration[-1])
                marks["objective"].append(trace.objective[-1])
                marks["label"].append("converged")
        self.objective_lines.data = {
            "xs": xs,
            "ys": ys,
            "color": colors,
            "width": widths,
            "label": labels,
        }
        self.objective.data = points
        self.converged.data = marks
        self.converged_legend.visible = bool(marks["iteration"])
        self.change.data = {
            "iteration": [i for x in cxs for i in x],
            "change": [c for y in cys for c in y],
            "color": [c for c, x in zip(ccolors, cxs, strict=True) for _ in x],
        }
        self.change_lines.data = {
            "xs": cxs,
            "ys": cys,
            "color": ccolors,
            "width": cwidths,
            "label": clabels,
        }
        shown = job.models.get(chosen) if chosen is not None else None
        sizes = job.sizes or (shown.sizes if shown else [])
        order = sorted(range(len(sizes)), key=lambda c: -sizes[c])
        self.sizes.data = {
            "rank": list(range(len(order))),
            "size": [sizes[c] for c in order],
            "cluster": order,
        }
        one = shown or ModelTrace()
        self.movement.data = {
            "iteration": list(one.iteration),
            "shift": [s if s > 0 else math.nan for s in one.shift],
            # the bounds are k-means': a mixture has no share to show
            "skipped": list(one.skipped) if job.mode == "kmeans" else [math.nan] * len(one.skipped),
        }


def _chosen_model(job: JobState) -> int | None:
    """The model the figures of one model show: the one of the chosen k, else the
    converged one with the best objective so far, else the first."""
    if not job.models:
        return None
    candidates = list(job.models)
    if job.chosen_k is not None:
        candidates = [
            i for i, t in job.models.items() if t.n_clusters == job.chosen_k
        ] or candidates
    converged = [i for i in candidates if job.models[i].converged] or candidates
    kmeans = job.mode == "kmeans"

    def final(i: int) -> float:
        last = job.models[i].objective[-1]
        return math.inf if math.isnan(last) else (last if kmeans else -last)

    return min(converged, key=final)


def facts_html(job: JobState) -> str:
    """The job's facts as an HTML table."""
    k = job.n_clusters
    if isinstance(k, list):
        k = f"{', '.join(map(str, k))}" + (f" (chose {job.chosen_k})" if job.chosen_k else "")
    rows = [
        ("job", html.escape(job.job)),
        ("config", html.escape(job.config or "-")),
        ("kind", html.escape(job.mode or "-")),
        ("k", html.escape(str(k if k is not None else "-"))),
        ("d", f"{job.n_features:,}" if job.n_features is not None else "-"),
        ("n", f"{job.n_samples:,}" if job.n_samples is not None else "-"),
        ("iteration", str(job.iteration)),
        (
            "seconds per iteration",
            "-" if job.seconds is None or math.isnan(job.seconds) else f"{job.seconds:.3f}",
        ),
        ("state", f'<b class="dkm-state">{html.escape(job.state)}</b>'),
        ("output", output_link(job.output)),
    ]
    if job.message and job.state == "failed":
        rows.append(("error", html.escape(job.message)))
    cells = "".join(
        f'<tr><th style="text-align:left;padding-right:1em">{name}</th><td>{value}</td></tr>'
        for name, value in rows
    )
    return f'<table class="dkm-facts">{cells}</table>'


# ------------------------------------------------------------------ registration


def _register_page() -> bool:
    """Add the page to the applications of distributed's scheduler dashboard (once)."""
    try:
        from distributed.dashboard import scheduler as dashboard
    except ImportError as e:  # no bokeh: the scheduler has no dashboard to add it to
        logger.warning("dkm dashboard page unavailable: %s", e)
        return False
    dashboard.applications.setdefault(ROUTE, _page_doc)
    return True


_REGISTERED = _register_page()


def dask_setup(scheduler: Any) -> None:
    """The preload's entry point: the plugin, and the page in the dashboard's navigation."""
    board(scheduler)
    if not _REGISTERED or "dashboard" not in getattr(scheduler, "services", {}):
        return
    from distributed.dashboard import scheduler as dashboard

    pages = dashboard.template_variables(scheduler)["pages"]
    if PAGE not in pages:
        pages.insert(pages.index("info") if "info" in pages else len(pages), PAGE)
