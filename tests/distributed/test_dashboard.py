"""The dkm page of the Dask dashboard and the report, as a person sees them in Chromium.

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``; ``.ci/run`` installs
them) is driven through Selenium with the system's chromedriver: no browser download.
Where they are missing the tests are skipped with the reason; with
``DKM_REQUIRE_BROWSER=1`` (set by ``.ci/run`` once it installed them) they fail instead.
Every page is on 127.0.0.1 or the file system. Screenshots go to the test's tmp_path.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import process_cluster, report_args

from dkm import dashboard
from dkm.config import load_config
from dkm.job import run_job
from dkm.monitor import EVENT_TOPIC, Progress

PACKAGES = "chromium chromium-driver"
DKM = [sys.executable, "-m", "dkm.cli"]


def _chromium() -> tuple[str, str]:
    """The paths of chromium and chromedriver; skip (or fail) where they are missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the test extra)")
    if missing:
        reason = (
            f"no headless browser here (missing: {', '.join(missing)}): install Debian's "
            f"{PACKAGES} (apt-get install {PACKAGES}; .ci/run does this as root or with sudo) and "
            "python -m pip install -e '.[test]'"
        )
        if os.environ.get("DKM_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + ", but DKM_REQUIRE_BROWSER=1 says they were installed")
        pytest.skip(reason)
    assert browser is not None and driver is not None
    return browser, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium that talks to nothing but this machine; yields the driver."""
    binary, driver_path = _chromium()  # first: skips (or fails) without selenium too
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1300",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    # the console (errors) and the DevTools network events (every request it made)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


#: JavaScript: the text a person sees (through Bokeh's shadow roots) and the plotted data.
_PAGE_JS = """
function text(node) {
    let out = "";
    if (node.shadowRoot) out += text(node.shadowRoot);
    for (const child of node.childNodes) {
        if (child.nodeType === 3) out += child.textContent + " ";
        else if (child.nodeType === 1 || child.nodeType === 11) out += text(child);
    }
    return out;
}
function state(node) {
    const found = node.querySelector ? node.querySelector(".dkm-state") : null;
    if (found) return found.textContent;
    const kids = [...(node.shadowRoot ? [node.shadowRoot] : []), ...node.children];
    for (const child of kids) { const s = state(child); if (s !== null) return s; }
    return null;
}
function column(name, key) {
    if (!window.Bokeh || !Bokeh.documents.length) return null;
    const source = Bokeh.documents[0].get_model_by_name(name);
    if (!source) return null;
    const data = source.data instanceof Map ? source.data : new Map(Object.entries(source.data));
    return Array.from(data.get(key) || []);
}
return {
    text: text(document.body),
    state: state(document.body),
    iterations: column("dkm-objective", "iteration"),
    sizes: column("dkm-sizes", "size"),
};
"""


def _read(driver: Any) -> dict[str, Any]:
    return dict(driver.execute_script(_PAGE_JS))


def _wait_for(driver: Any, ready: Callable[[dict[str, Any]], bool], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    page = _read(driver)
    while not ready(page):
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not get there in {timeout:g} s: {page}")
        time.sleep(0.2)
        page = _read(driver)
    return page


def _console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _requests(driver: Any) -> list[str]:
    """The URLs of every request the page made (DevTools' network events)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _shot(driver: Any, path: Path) -> Path:
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    copy_to = os.environ.get("DKM_SCREENSHOTS")  # where a person wants to look at them
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(copy_to) / path.name)
    return path


def _config(path: Path, cluster: dict[str, Any], output: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                # more clusters in the data than in the model: a fit of several iterations
                "data": {
                    "kind": "synthetic",
                    "n": 20_000,
                    "d": 4,
                    "k": 12,
                    "spread": 3.0,
                    "chunk_rows": 5_000,
                },
                "model": {"mode": "kmeans", "n_clusters": 6, "init": "random", "seed": 2},
                "cluster": cluster,
                "output": {"path": str(output), "labels": False},
            }
        )
    )
    return path


class _Paced(Progress):
    """A job's progress that slows its iterations down (so the page can be seen during
    the fit) and holds the job before its end is published, its scheduler still up,
    until the test has looked at the page."""

    def __init__(self) -> None:
        super().__init__("pending", quiet=True)
        self.dashboard: str | None = None
        self.iterations = 0
        self.ending = threading.Event()
        self.looked = threading.Event()

    def __call__(self, info: Any) -> None:
        super().__call__(info)
        self.iterations += 1
        time.sleep(0.4)

    def event(self, event: str, message: str, *, echo: bool = True, **fields: Any) -> None:
        if event == "start":
            self.dashboard = fields.get("dashboard")
        super().event(event, message, echo=echo, **fields)
        if event == "done":
            self.ending.set()
            self.looked.wait(120)


def test_the_page_follows_a_run_on_dkms_own_local_cluster(browser, tmp_path):
    """`dkm run` with cluster.kind local: dkm puts the page on the scheduler it starts."""
    path = _config(
        tmp_path / "local.yaml",
        {
            "kind": "local",
            "n_workers": 1,
            "threads_per_worker": 2,
            "processes": False,
            "dashboard_address": "127.0.0.1:0",
        },
        tmp_path / "out",
    )
    config = load_config(path)
    progress = _Paced()
    result: dict[str, Any] = {}
    job = threading.Thread(
        target=lambda: result.update(
            summary=run_job(config, progress=progress, config_source=str(path)).summary
        )
    )
    job.start()
    try:
        deadline = time.monotonic() + 60
        while progress.iterations < 2 and job.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert progress.dashboard is not None and progress.dashboard.startswith(
            "http://127.0.0.1:"
        ), progress.dashboard
        page_url = progress.dashboard.rsplit("/", 1)[0] + dashboard.ROUTE
        browser.get(page_url)
        during = _wait_for(browser, lambda p: p["state"] == "running" and p["iterations"])
        _shot(browser, tmp_path / "dkm-page-during-fit.png")
        during_iterations = len(during["iterations"])
        assert "local.yaml" in during["text"] and "kmeans" in during["text"]
        assert "Dkm" in during["text"]  # listed in the dashboard's navigation
        assert progress.ending.wait(120), "the job did not finish"
        after = _wait_for(browser, lambda p: p["state"] == "converged")
        _shot(browser, tmp_path / "dkm-page-after-fit.png")
        assert _console_errors(browser) == []
    finally:
        progress.looked.set()
        job.join(120)
    summary = result["summary"]
    assert summary["converged"] and summary["n_iter"] >= 5
    assert during_iterations < summary["n_iter"]  # the first picture was taken mid-fit
    assert sorted(after["iterations"]) == list(range(1, summary["n_iter"] + 1))
    assert after["sizes"] == sorted(summary["cluster_sizes"], reverse=True)
    assert sum(after["sizes"]) == 20_000


@pytest.mark.distributed
def test_the_page_on_a_standing_scheduler_with_the_preload(browser, tmp_path):
    """`dask scheduler --preload dkm.dashboard`, and `dkm run` against it as another
    process: the job's last state stays on the page after the job has gone."""
    with process_cluster(tmp_path, 1, scheduler_args=("--preload", "dkm.dashboard")) as cluster:
        config = _config(
            tmp_path / "standing.yaml",
            {"kind": "address", "address": cluster.address},
            tmp_path / "out",
        )
        run = subprocess.run(
            [*DKM, "run", str(config), "--log-format", "json"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        start = next(
            json.loads(line)
            for line in run.stderr.splitlines()
            if line.startswith("{") and json.loads(line).get("event") == "start"
        )
        link = start["dashboard"]
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        browser.get(link.rsplit("/", 1)[0] + dashboard.ROUTE)
        page = _wait_for(browser, lambda p: p["state"] == "converged" and p["iterations"])
        _shot(browser, tmp_path / "dkm-page-standing-scheduler.png")
        assert _console_errors(browser) == []
        assert summary["job"] in page["text"] and "standing.yaml" in page["text"]
        assert sorted(page["iterations"]) == list(range(1, summary["n_iter"] + 1))
        assert page["sizes"] == sorted(summary["cluster_sizes"], reverse=True)
        # the navigation lists the page on the scheduler's other pages too
        browser.get(link)
        links = browser.execute_script(
            "return [...document.querySelectorAll('.navbar a')].map(a => a.textContent)"
        )
        assert "Dkm" in links
        from distributed import Client

        with Client(cluster.address) as client:  # what the page read: the job's events
            events = [e for _, e in client.get_events(EVENT_TOPIC) if e["job"] == summary["job"]]
        iteration = next(e for e in events if e["event"] == "iteration")
        assert {"sizes", "shift", "skipped", "converged"} <= set(iteration)
    # the report of that run, as its user opens it
    text = _check_report(
        browser, tmp_path / "out" / "report" / "index.html", tmp_path / "report.png"
    )
    for fact in ("n_clusters", "n_samples", "n_features", "n_iter", "objective", "fit_seconds"):
        assert fact in text
    assert "cluster sizes" in text and "data_fingerprint" in text and "standing.yaml" in text
    assert "\nConfig\n" in text and "n_clusters: 6" in text


def _check_report(driver: Any, index: Path, shot: Path) -> str:
    """Open a report's index.html from the file system: every image loads, every request
    is for a file (nothing leaves the machine), no console error. Returns its text."""
    # drained: what the pages before logged and asked for is not the report's
    _requests(driver)
    _console_errors(driver)
    driver.get(index.as_uri())
    _wait_for(
        driver,
        lambda _: driver.execute_script("return [...document.images].every(i => i.complete)"),
    )
    widths = driver.execute_script("return [...document.images].map(i => i.naturalWidth)")
    assert len(widths) >= 3 and all(w > 0 for w in widths), widths
    urls = _requests(driver)
    assert {Path(u).name for u in urls} >= {"index.html", "convergence.png", "sizes.png"}
    assert all(u.startswith(("file://", "data:")) for u in urls), urls
    assert _console_errors(driver) == []
    driver.set_window_size(1200, 3400)  # the whole page in one picture
    _shot(driver, shot)
    driver.set_window_size(1400, 1300)
    return str(driver.execute_script("return document.body.innerText"))


def test_the_report_opens_offline_with_every_image(browser, tmp_path):
    """The report's index.html from the file system (write_report's own)."""

    from dkm import report

    out = tmp_path / "report"
    out.mkdir()
    report.write_report(out, config={"model": {"n_clusters": 4}}, **report_args())
    text = _check_report(browser, out / "index.html", tmp_path / "report-write-report.png")
    assert "cluster sizes" in text and "Config" in text and "n_clusters: 4" in text


# ------------------------------------------------------------- without a browser


def _events(job: str, *iterations: tuple[int, float, bool], model: int = 0) -> list[dict]:
    return [
        {
            "event": "iteration",
            "job": job,
            "model": model,
            "iteration": i,
            "objective": objective,
            "relative_change": None if i == 1 else 0.1,
            "seconds": 0.5,
            "sizes": [3.0, 1.0],
            "shift": 0.25,
            "skipped": 0.5,
            "converged": converged,
        }
        for i, objective, converged in iterations
    ]


def test_the_board_keeps_each_jobs_state_from_its_events():
    board = dashboard.JobBoard()
    start = {"event": "start", "job": "a", "config": "c.yaml", "mode": "kmeans", "n_clusters": 2}
    for record in [start, *_events("a", (1, 10.0, False), (2, 8.0, True))]:
        board.log_event(EVENT_TOPIC, record)
    job = board.jobs["a"]
    assert (job.state, job.iteration, job.config) == ("running", 2, "c.yaml")
    assert job.models[0].sizes == [3.0, 1.0] and job.sizes == []
    assert job.models[0].objective == [10.0, 8.0] and job.models[0].converged
    board.log_event(EVENT_TOPIC, {"event": "done", "job": "a", "converged": True, "sizes": [2, 2]})
    assert (job.state, job.sizes) == ("converged", [2.0, 2.0])
    board.log_event(EVENT_TOPIC, {"event": "failed", "job": "b", "message": "boom"})
    assert board.jobs["b"].state == "failed" and "boom" in dashboard.facts_html(board.jobs["b"])
    board.log_event("other-topic", {"event": "start", "job": "c"})
    board.log_event(EVENT_TOPIC, {"event": "iteration", "job": "d"})  # malformed: no iteration
    board.log_event(EVENT_TOPIC, "not a record")
    assert list(board.jobs) == ["a", "b", "d"] and board.jobs["d"].iteration == 0


def test_iterations_on_a_sample_are_said_not_drawn():
    """The sampled schedule's iterations go to the status line; the figures hold the
    iterations on all the data, numbered from 1."""
    job = dashboard.JobState("j", mode="kmeans")
    for record in _events("j", (1, 9.0, False), (2, 8.0, False)):
        job.update({**record, "sample": 16384})
    assert job.models == {} and job.iteration == 0
    assert job.message == "iteration 2 on a sample of 16,384 rows"
    for record in _events("j", (1, 7.0, False)):
        job.update(record)
    assert job.models[0].iteration == [1] and job.iteration == 1 and job.message == ""


def test_the_figures_of_one_model_show_the_chosen_one():
    """Restarts: the converged model with the best objective; a sweep: the chosen k's."""
    job = dashboard.JobState("j", mode="kmeans")
    for model, last in ((0, 5.0), (1, 3.0), (2, 1.0)):
        for record in _events("j", (1, 9.0, False), (2, last, model != 2), model=model):
            job.update(record)
    assert dashboard._chosen_model(job) == 1  # model 2 has the lowest but did not converge
    job.mode = "gmm"  # a log-likelihood: higher is better
    assert dashboard._chosen_model(job) == 0
    job.models[2].n_clusters, job.chosen_k = 5, 5
    assert dashboard._chosen_model(job) == 2


def test_the_board_forgets_the_oldest_ended_jobs_first(monkeypatch):
    monkeypatch.setattr(dashboard, "MAX_JOBS", 3)
    board = dashboard.JobBoard()
    board.log_event(EVENT_TOPIC, {"event": "start", "job": "running"})
    for name in ("x", "y", "z"):
        board.log_event(EVENT_TOPIC, {"event": "done", "job": name})
    assert list(board.jobs) == ["running", "y", "z"]


def test_output_links_open_local_paths_only():
    assert dashboard.output_link("/data/out a") == (
        '<a href="file:///data/out%20a" target="_blank">/data/out a</a>'
    )
    assert dashboard.output_link("s3://bucket/<out>") == "s3://bucket/&lt;out&gt;"
    assert dashboard.output_link(None) == "-"


def test_dkms_local_cluster_lists_the_page_and_keeps_the_dashboard_on_localhost():
    from urllib.request import urlopen

    from dkm.cluster import connect
    from dkm.config import LocalClusterConfig

    cfg = LocalClusterConfig(processes=False, n_workers=1, dashboard_address="127.0.0.1:0")
    with connect(cfg) as client:
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        root = link.rsplit("/", 1)[0]
        with urlopen(f"{root}/status", timeout=30) as r:
            assert 'href="dkm"' in r.read().decode()
        with urlopen(f"{root}{dashboard.ROUTE}", timeout=30) as r:
            assert r.status == 200 and "bokeh" in r.read().decode()  # a Bokeh page, not a 404
        assert client.run_on_scheduler(
            lambda dask_scheduler: isinstance(
                dask_scheduler.plugins.get(dashboard.JobBoard.name), dashboard.JobBoard
            )
        )


def test_the_page_draws_one_line_per_model_and_the_chosen_models_figures():
    """A sweep over k: a line (and points) per model, the chosen k's drawn thicker, its
    movement shown; the sizes sorted; a mixture has no share of skipped rows."""
    board = dashboard.JobBoard()
    board.log_event(
        EVENT_TOPIC, {"event": "start", "job": "s", "mode": "gmm", "n_clusters": [2, 3]}
    )
    for model in (0, 1, 2):
        for record in _events("s", (1, -3.0, False), (2, -2.5, True), model=model):
            record["sizes"] = [1.0, 5.0, 2.0][: 2 + (model == 1)]
            board.log_event(EVENT_TOPIC, record)
    board.log_event(EVENT_TOPIC, {"event": "selected", "job": "s", "n_clusters": 3})
    page = dashboard.JobPage(board)
    page.update()
    lines = page.objective_lines.data
    assert len(lines["xs"]) == 3 and lines["width"] == [1.5, 3, 1.5]  # model 1 has k=3
    assert len(page.objective.data["iteration"]) == 6  # every iteration of every model
    assert page.converged.data["label"] == ["converged"] * 3
    assert page.sizes.data["size"] == [5.0, 2.0, 1.0]  # the chosen model's, largest first
    assert page.sizes.data["cluster"] == [1, 2, 0]
    movement = page.movement.data
    assert movement["iteration"] == [1, 2] and all(math.isnan(s) for s in movement["skipped"])
    assert "gmm" in page.facts.text and "2, 3 (chose 3)" in page.facts.text
    assert page.select.value == "s"


def test_the_page_follows_the_newest_job_until_one_is_chosen():
    board = dashboard.JobBoard()
    page = dashboard.JobPage(board)
    page.update()  # no job yet: the page says so
    assert "No dkm job" in page.facts.text
    board.log_event(EVENT_TOPIC, {"event": "start", "job": "first"})
    page.update()
    board.log_event(EVENT_TOPIC, {"event": "start", "job": "second"})
    page.update()
    assert page.select.value == "second" and [k for k, _ in page.select.options] == [
        "second",
        "first",
    ]
    page.select.value = "first"  # the person's choice
    board.log_event(EVENT_TOPIC, {"event": "start", "job": "third"})
    page.update()
    assert page.select.value == "first" and "first" in page.facts.text
