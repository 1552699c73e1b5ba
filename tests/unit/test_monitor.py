"""Progress lines, JSON logs and scheduler events."""

from __future__ import annotations

import io as stdio
import json

import numpy as np

from dkm.engine import IterationInfo
from dkm.kernels import MixtureParams
from dkm.monitor import EVENT_TOPIC, Progress, job_status

PARAMS = MixtureParams.identity(np.zeros((2, 2)))


def infos():
    return [
        IterationInfo(1, 100.0, float("inf"), 0.5, PARAMS),
        IterationInfo(2, 90.0, 1.5, 0.25, PARAMS),
    ]


class Tty(stdio.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_table_and_plain_lines():
    tty = Tty()
    p = Progress("job1", stream=tty)
    for i in infos():
        p(i)
    lines = tty.getvalue().splitlines()
    assert lines[0].split() == ["iter", "objective", "rel.", "change", "seconds"]
    assert lines[2].split()[:3] == ["2", "90", "1.000e-01"]
    plain = stdio.StringIO()
    p = Progress("job1", stream=plain)
    for i in infos():
        p(i)
    second = plain.getvalue().splitlines()[1]
    assert "iteration 2:" in second and "objective=90" in second and "relative_change=0.1" in second


def test_json_lines_records_and_publish():
    out = stdio.StringIO()
    published = []
    p = Progress("job2", fmt="json", stream=out, publish=published.append)
    p.event("start", "starting")
    for i in infos():
        p(i)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["start", "iteration", "iteration"]
    assert records[1]["change"] is None  # inf is not JSON
    assert records[2]["relative_change"] == 0.1
    # the scheduler's events carry the log's fields, and for the dashboard's page more
    assert [{k: r[k] for k in line} for r, line in zip(published, records, strict=True)] == records
    assert published[2]["converged"] is False and "sizes" not in records[2]
    assert p.records == records[1:]


def test_quiet_prints_only_failures_and_publishing_errors_do_not_break_the_job():
    out = stdio.StringIO()

    def broken(record):
        raise ConnectionError("scheduler gone")

    p = Progress("job3", quiet=True, stream=out, publish=broken)
    for i in infos():
        p(i)
    p.event("done", "done")
    assert out.getvalue() == ""
    p.event("failed", "it broke")
    assert "it broke" in out.getvalue()
    assert len(p.records) == 2


def test_job_status_keeps_latest_per_job():
    class FakeClient:
        def get_events(self, topic):
            assert topic == EVENT_TOPIC
            return [
                (1.0, {"job": "a", "event": "start"}),
                (2.0, {"job": "a", "event": "iteration", "iteration": 1, "objective": 5.0}),
                (3.0, {"job": "b", "event": "start"}),
                (4.0, {"job": "a", "event": "done"}),
                (5.0, "not a dkm record"),
            ]

    status = job_status(FakeClient())
    assert status["a"]["latest"]["event"] == "done"
    assert status["a"]["last_iteration"]["iteration"] == 1
    assert "last_iteration" not in status["b"]
