"""Watching a run: per-iteration progress lines, JSON logs, and events on the scheduler."""

from __future__ import annotations

import datetime
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TextIO

from dkm.engine import IterationInfo

#: Topic of the events a running job publishes on its scheduler (``dkm status`` reads it).
EVENT_TOPIC = "dkm-progress"
LogFormat = Literal["text", "json"]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Progress:
    """The per-iteration callback of a job: records, prints and publishes each iteration.

    On a terminal it prints an aligned table; otherwise (a batch log) one plain
    ``key=value`` line per event; with ``fmt="json"`` one JSON object per line. Every
    record also goes to ``publish`` (e.g. the scheduler's event log) and is kept in
    ``records`` for the metrics file.
    """

    def __init__(
        self,
        job_id: str,
        *,
        fmt: LogFormat = "text",
        quiet: bool = False,
        stream: TextIO | None = None,
        publish: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.fmt = fmt
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.publish = publish
        self.records: list[dict[str, Any]] = []
        #: warnings seen during the job, in order, each once (``summary.json`` lists them)
        self.warnings: list[str] = []
        self._held: list[tuple[str, str, bool, dict[str, Any]]] | None = None
        self._header_done = False
        #: the last objective of each model (restarts and sweeps iterate several at once)
        self._previous: dict[int, float] = {}

    @property
    def _tty(self) -> bool:
        return self.fmt == "text" and bool(getattr(self.stream, "isatty", lambda: False)())

    def prefill(self, history: Iterable[IterationInfo]) -> None:
        """Record iterations done before a resume, without printing or publishing them."""
        for info in history:
            self.records.append(self._record(info))

    def __call__(self, info: IterationInfo) -> None:
        record = self._record(info)
        relative = record["relative_change"]
        self.records.append(record)
        self._publish({**record, **_published(info)})
        if self.quiet:
            return
        if self._tty:
            if not self._header_done:
                self._write(f"{'iter':>5}  {'objective':>16}  {'rel. change':>11}  {'seconds':>8}")
                self._header_done = True
            rel = "" if relative is None else f"{relative:11.3e}"
            it, obj, sec = info.iteration, info.objective, info.seconds
            model = f"  (model {info.run})" if len(self._previous) > 1 else ""
            if info.sample is not None:
                model += f"  (sample of {info.sample:,} rows)"
            self._write(f"{it:5d}  {obj:16.8g}  {rel:>11}  {sec:8.3f}{model}")
        else:
            self._emit(record)

    def _record(self, info: IterationInfo) -> dict[str, Any]:
        previous = self._previous.get(info.run)
        self._previous[info.run] = info.objective
        relative = (
            abs(info.objective - previous) / abs(previous)
            if previous not in (None, 0.0) and math.isfinite(info.objective)
            else None
        )
        return {
            "event": "iteration",
            "job": self.job_id,
            "time": _now(),
            **info.to_dict(nonfinite="null"),
            "model": info.run,
            "relative_change": relative,
        }

    def hold(self) -> None:
        """Keep job-level events until :meth:`release` (the dashboard link goes first)."""
        if self._held is None:
            self._held = []

    def release(self, first: Callable[[], None] | None = None) -> None:
        """Stop holding: call ``first`` (e.g. the start event), then replay what was held."""
        held, self._held = self._held or [], None
        if first is not None:
            first()
        for event, message, echo, fields in held:
            self.event(event, message, echo=echo, **fields)

    def warning(self, message: str) -> None:
        """A warning, in the job's own words, once: a log line (hidden by --quiet)."""
        if message in self.warnings:
            return
        self.warnings.append(message)
        self.event("warning", f"warning: {message}")

    @contextmanager
    def capture_warnings(self) -> Iterator[None]:
        """Route Python warnings raised inside the block to :meth:`warning`.

        Library warnings (a ``ConvergenceWarning``, a dashboard port already in use) would
        otherwise print as ``file:line`` with a code line, past ``--quiet`` and outside
        the JSON log.
        """

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            self.warning(f"{message} ({category.__name__})")

        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            yield

    def event(self, event: str, message: str, *, echo: bool = True, **fields: Any) -> None:
        """A job-level event (start, data, done, failed); ``echo=False`` only publishes."""
        if self._held is not None:
            if event != "failed":
                self._held.append((event, message, echo, fields))
                return
            self.release()  # what happened before the failure is told first
        record = {"event": event, "job": self.job_id, "time": _now(), "message": message, **fields}
        self._publish(record)
        if not echo or (self.quiet and event != "failed"):
            return
        if self.fmt == "json":
            self._write(json.dumps(record, default=str))
        else:
            self._write(message if self._tty else f"{record['time']} {message}")

    def _emit(self, record: dict[str, Any]) -> None:
        if self.fmt == "json":
            self._write(json.dumps(record, default=str))
            return
        fields = " ".join(
            f"{k}={v:.8g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in record.items()
            if k not in ("time", "event", "job", "iteration", "sample")
            and v is not None
            and (k != "converged" or v)
            # which model: only when several iterate together (restarts, a sweep over k)
            and (k != "model" or len(self._previous) > 1)
        )
        sample = record.get("sample")
        on = "" if sample is None else f" on a sample of {sample:,} rows"
        self._write(f"{record['time']} iteration {record['iteration']}{on}: {fields}")

    def _publish(self, record: dict[str, Any]) -> None:
        if self.publish is not None:
            try:
                self.publish(record)
            except Exception:
                self.publish = None

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def _published(info: IterationInfo) -> dict[str, Any]:
    """What the scheduler's events carry of an iteration beyond its record (the
    dashboard's page, :mod:`dkm.dashboard`): O(k), not kept in ``metrics.jsonl``."""
    extra: dict[str, Any] = {"converged": bool(info.converged)}
    if info.sizes is not None:
        extra["sizes"] = [float(s) for s in info.sizes]
    if info.shift is not None and math.isfinite(info.shift):
        extra["shift"] = float(info.shift)
    if info.skipped is not None:
        extra["skipped"] = float(info.skipped)
    return extra


def scheduler_publisher(client: Any) -> Callable[[dict[str, Any]], None]:
    """Publish records as events on the scheduler (``Client.log_event``)."""

    def publish(record: dict[str, Any]) -> None:
        client.log_event(EVENT_TOPIC, record)

    return publish


def job_status(client: Any) -> dict[str, dict[str, Any]]:
    """The latest event of every job that published to this scheduler, by job id."""
    latest: dict[str, dict[str, Any]] = {}
    for _, record in client.get_events(EVENT_TOPIC):
        if isinstance(record, dict) and "job" in record:
            current = latest.setdefault(record["job"], {})
            if record.get("event") == "iteration":
                current["last_iteration"] = record
            elif record.get("event") == "start":
                current["start"] = record
            current["latest"] = record
    return latest
