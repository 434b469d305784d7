"""The MLflow UI as a person sees it, in a real headless browser: two pipeline runs of one pico config (another
lr in the second) tracked to a SQLite store, the MLflow server started on it, and Debian's Chromium driven by
selenium. A screenshot of each page is kept under .cache/test-artifacts/mlflow-ui/.

Skipped where Chromium or its driver is missing (Debian: `apt-get install chromium chromium-driver`; .ci/run
installs them).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MEMORISE, REPO, pico_raw
from tests.servers import server
from unlearning.train.launch import free_port

pytestmark = pytest.mark.browser
BIN = Path(sys.executable).parent
SHOTS = REPO / ".cache" / "test-artifacts" / "mlflow-ui"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _raw(out: Path, uri: str, lr: float) -> dict[str, Any]:
    return pico_raw(out, model={"finetune": MEMORISE}, methods=[{"name": "ga"}, {"name": "npo"}],
                    train={"num_processes": 1, "batch_size": 4, "max_steps": 3, "lr": lr},
                    eval={"suite": "tofu", "max_new_tokens": 8, "models": ["target", "oracle", "unlearned"]},
                    tracking={"uri": uri, "register_models": False})


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two pipeline runs in one store and the MLflow server on it: the URL, the reports and the experiment id."""
    if not (CHROMIUM and DRIVER):
        pytest.skip("Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    base = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(base)  # the store's artifacts go to ./mlruns: here, not in the repository
    try:
        with prefect_test_harness(server_startup_timeout=120):
            reports = [pipeline(_raw(base / "run", uri, lr)) for lr in (1e-3, 2e-3)]
    finally:
        os.chdir(cwd)
    experiment = MlflowClient(uri).get_experiment_by_name("pico").experiment_id
    port = free_port()
    with server([str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
                 str(port), "--workers", "1"], {**os.environ}, base / "mlflow.log", f"http://127.0.0.1:{port}/health"):
        yield {"url": f"http://127.0.0.1:{port}", "reports": reports, "experiment": experiment, "uri": uri}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=3800,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _page_text(driver: Any, url: str, *wanted: str, name: str, timeout: float = 60) -> str:
    """Open `url`, wait until the page's text holds every string of `wanted`, keep a screenshot; the text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        WebDriverWait(driver, timeout).until(lambda d: all(w in d.find_element("tag name", "body").text
                                                           for w in wanted))
    except TimeoutException:
        driver.save_screenshot(str(SHOTS / f"{name}-failed.png"))
        text = driver.find_element("tag name", "body").text
        missing = [w for w in wanted if w not in text]
        raise AssertionError(f"{url}: not on the page: {missing}\n--- the page ---\n{text[:4000]}") from None
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    return driver.find_element("tag name", "body").text


def _js_number(value: float) -> str:
    """`value` as the UI prints it (JavaScript's shortest round-trip form, positional from 1e-7 up)."""
    import numpy as np

    return np.format_float_positional(value, trim="-") if 1e-7 <= abs(value) < 1e21 else repr(value)


def _on_server(link: str, url: str) -> str:
    """A link from the report (it names the default `mlflow ui` address) on the test's server."""
    return url + link[link.index("/#/"):]


def test_the_runs_table_opens_in_the_training_view_and_compares_both_runs_without_expanding(ui, browser):
    """The link the CLI prints: the training view (not GenAI's traces), one row per pipeline run named by what ran,
    the prepared dataset, and every model's forget quality and utility as columns, equal to the reports."""
    first, second = ui["reports"]
    link = _on_server(second["mlflow_compare"], ui["url"])
    wanted = ["Runs", "pico · lr 0.001 · ga, npo · 1 seed", "pico · lr 0.002 · ga, npo · 1 seed",
              *(f"{label}.{metric}" for label in ("target", "ga", "npo") for metric in ("forget_quality",
                                                                                       "model_utility"))]
    values = [_js_number(report["metrics"][label][metric]) for report in (first, second)
              for label in ("target", "oracle", "ga", "npo") for metric in ("forget_quality", "model_utility")
              if report["metrics"][label][metric] is not None]
    text = _page_text(browser, link, *wanted, *values, name="runs-table")
    assert "workflowType=machine_learning" in browser.current_url
    assert "Token Usage" not in text and "Sessions" not in text  # GenAI's overview is not what opened
    from mlflow.tracking import MlflowClient

    top = [r for r in MlflowClient(ui["uri"]).search_runs([ui["experiment"]])
           if "mlflow.parentRunId" not in r.data.tags]
    digest = top[0].data.tags["data_fingerprint"]
    assert f"pico ({digest})" in text  # the prepared data, as a dataset input with its fingerprint as digest


def test_a_run_page_shows_the_report_its_models_and_the_tradeoff_plot(ui, browser):
    report = ui["reports"][0]
    run = _on_server(report["mlflow_run"], ui["url"])
    text = _page_text(browser, run, "Description", "Seeds: 0", "Logged models (2)", "ga.loss", "npo.loss",
                      name="run-overview")
    assert "pico · lr 0.001 · ga, npo · 1 seed" in text
    artifacts = run.replace("?", "/artifacts?", 1)
    _page_text(browser, artifacts, "tradeoff.png", "report.md", "config.resolved.json", name="run-artifacts")
    models = f"{ui['url']}/#/experiments/{ui['experiment']}/models?workflowType=machine_learning"
    _page_text(browser, models, "unlearn-ga", "unlearn-npo", "Ready", name="logged-models")
