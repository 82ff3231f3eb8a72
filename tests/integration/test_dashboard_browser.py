"""The dashboard's pages in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

Checks what a person would see: the runs table lists, sorts and filters the fixture runs; a run page
draws its curves; an eval job's page shows its scores as a table and as bars per task, without training charts;
a live run's new metric lines appear without a reload; the scaling page shows the exponent of a synthetic sweep
with a known power law; the compare page overlays runs and puts eval scores side by side; the sweep page charts
swept values against a metric; the 'try it' page scores captions with a real checkpoint. Screenshots go to the
test's tmp folder, and to docs/screenshots/ when CLIPFORGE_UPDATE_SCREENSHOTS=1.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import urllib.parse
from pathlib import Path

import pytest
from test_dashboard_evals import SUITE, write_eval_suite

from test_dashboard_api import logged, make_runs_folder, metric_lines, write_run

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,960", "--hide-scrollbars"]
KNOWN_ALPHA = -0.12
WAIT_S = 60

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - reported as a skip below
    webdriver = None

if webdriver is None or not CHROMIUM.exists() or not CHROMEDRIVER.exists():
    pytest.skip("browser tests need Selenium (pip) and Debian's Chromium + ChromeDriver: "
                "`apt-get install -y chromium chromium-driver`", allow_module_level=True)


def add_scaling_sweep(root: Path, seed: int = 0) -> None:
    """Runs whose error follows E = beta * C^alpha, several per compute bin, most of them above the law."""
    rng = random.Random(seed)
    beta = 0.9 / (1e6 ** KNOWN_ALPHA)
    for k in range(6 * 4, 11 * 4):
        for j in range(3):
            compute = 10 ** ((k + rng.uniform(0.2, 0.8)) / 4)
            error = beta * compute ** KNOWN_ALPHA * math.exp(abs(rng.gauss(0, 0.06)))
            write_run(root, f"scaling/c{k}_{j}", steps=2, rate=0.02 + 0.01 * j,
                      summary={"samples_seen": compute, "params": 10_000, "gmacs": 1.0},
                      evals={"ds/acc1": [None, 1 - error]})
    (root / "scaling" / "sweep.json").write_text(json.dumps({"fields": ["data.samples"], "children": []}))


def add_showcase_sweep(root: Path) -> list[str]:
    """Three longer runs with every curve the trainer logs (for the screenshots in the docs)."""
    rng = random.Random(7)
    ids = []
    for lr in (5e-4, 1e-3, 2e-3):
        rel = f"showcase/lr{lr:g}"
        run = write_run(root, rel, steps=0, summary=None)
        lines = []
        for i in range(1, 121):
            step = i * 5
            warm = min(1.0, step / 50)
            rec = {"step": step, "epoch": 1 + step // 100, "time": 1.79e9 + step * 0.6,
                   "loss": 1.1 + 3.2 * math.exp(-step * lr * 6) + rng.gauss(0, 0.04),
                   "lr": lr * warm * 0.5 * (1 + math.cos(math.pi * step / 600)),
                   "logit_scale": 14.3 + 30 * (1 - math.exp(-step * lr * 3)), "samples_seen": step * 256,
                   "samples_per_second": 820 + rng.gauss(0, 25), "step_time": 0.31 + rng.gauss(0, 0.01),
                   "data_wait": max(0.0, 0.04 + rng.gauss(0, 0.015)), "memory": 2.1e9 + 3e8 * warm,
                   "grad_norm": 2.5 * math.exp(-step / 250) + 0.3 + abs(rng.gauss(0, 0.08))}
            if step % 100 == 0:
                rec["eval/fashion_mnist/acc1"] = 0.1 + 0.55 * (1 - math.exp(-step * lr * 4)) + rng.gauss(0, 0.01)
                rec["eval/tuxpaint/image_retrieval_recall@1"] = 0.02 + 0.3 * (1 - math.exp(-step * lr * 3))
            lines.append(json.dumps(rec))
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (run / "summary.json").write_text(json.dumps({"samples_seen": 600 * 256, "wall_seconds": 372.0,
                                                      "samples_per_second": 818.0, "params": 27_400_000,
                                                      "gmacs": 1.43}))
        ids.append(rel)
    (root / "showcase" / "sweep.json").write_text(json.dumps({"fields": ["optim.lr"], "children": [
        {"dir": r.split("/")[1], "values": {"optim.lr": float(r.split("lr")[1])}} for r in ids]}))
    return ids


def add_trained_checkpoint(root: Path) -> str:
    """A real (tiny, randomly initialised) checkpoint in the project's format, for the 'try it' page."""
    from clipforge.models import create_model, save_checkpoint
    from clipforge.models.spec import ModelSpec

    bundle = create_model(ModelSpec(name="tiny"))
    run = write_run(root, "trained", steps=4, summary={"samples_seen": 32})
    save_checkpoint(str(run / "checkpoints" / "epoch_0001"), bundle.model.state_dict(),
                    {"step": 20, "epoch": 1, "samples_seen": 32, "model_name": "tiny",
                     "spec": {"model": {"name": "tiny"}}})
    return "trained/checkpoints/epoch_0001"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from clipforge.dashboard.server import start_in_thread
    from clipforge.dashboard.spec import DashboardSpec

    tmp = tmp_path_factory.mktemp("dashboard-site")
    root = make_runs_folder(tmp)
    add_scaling_sweep(root)
    showcase = add_showcase_sweep(root)
    checkpoint = add_trained_checkpoint(root)
    write_eval_suite(root / "demo" / "eval" / "suite")
    server, thread = start_in_thread(DashboardSpec(runs=str(root), port=0, estimate_compute=False,
                                                   rescan_interval_s=0))
    yield {"url": server.url, "root": root, "checkpoint": checkpoint, "shots": tmp / "screenshots",
           "showcase": showcase}
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def open_page(browser, site, path: str) -> None:
    browser.get(site["url"] + path)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.execute_script("return document.body.dataset.loaded === '1'"))


def screenshot(browser, site, name: str) -> Path:
    site["shots"].mkdir(exist_ok=True)
    path = site["shots"] / f"{name}.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("CLIPFORGE_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / f"dashboard_{name}.png")
    return path


def table_ids(browser) -> list[str]:
    # Read in one script: the table is re-rendered when the page refreshes its data.
    return browser.execute_script(
        "return [...document.querySelectorAll('#runs-table tbody tr')].map((tr) => tr.dataset.id);")


def table_column(browser, index: int) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll('#runs-table tbody tr')]"
        ".map((tr) => tr.cells[arguments[0]].textContent);",
        index)


def series_points(browser, chart_id: str) -> list[int]:
    paths = browser.find_elements(By.CSS_SELECTOR, f"#{chart_id} svg.cf-chart path.cf-series")
    return [int(p.get_attribute("data-points")) for p in paths]


def test_runs_table_lists_sorts_and_filters(browser, site):
    open_page(browser, site, "/?poll=600000")
    ids = table_ids(browser)
    for expected in ("alpha", "sweep/lr0", "sweep/lr1", "live", "old", "broken", "fresh", "evals/untrained",
                     "trained", "scaling/c24_0"):
        assert expected in ids
    assert "escape" not in ids and "notes" not in ids
    status = dict(zip(ids, table_column(browser, 4)))
    assert status["broken"] == "failed" and status["alpha"] == "finished" and status["fresh"] == "stopped"
    sweep = dict(zip(ids, table_column(browser, 2)))
    assert sweep["sweep/lr0"] == "sweep" and sweep["evals/untrained"] == ""  # a plain folder is not a sweep
    screenshot(browser, site, "runs")

    browser.find_element(By.CSS_SELECTOR, '#runs-table th[data-key="samples_seen"]').click()
    ids = table_ids(browser)
    assert ids[0].startswith("scaling/c43_")  # largest samples seen first
    assert ids[-1] in ("fresh", "evals/untrained", "linked", "demo/eval/suite")  # runs without a value sort last

    box = browser.find_element(By.ID, "filter")
    box.send_keys("sweep/")
    WebDriverWait(browser, WAIT_S).until(lambda d: sorted(table_ids(d)) == ["sweep/lr0", "sweep/lr1"])
    box.clear()
    box.send_keys("failed")
    WebDriverWait(browser, WAIT_S).until(lambda d: table_ids(d) == ["broken"])


def test_run_page_draws_training_and_eval_curves(browser, site):
    open_page(browser, site, "/run?id=alpha")
    for chart in ("chart-loss", "chart-lr", "chart-temperature", "chart-throughput", "chart-data_wait",
                  "chart-memory", "chart-grad_norm"):
        assert series_points(browser, chart) == [6], chart
    loss_path = browser.find_element(By.CSS_SELECTOR, "#chart-loss path.cf-series").get_attribute("d")
    assert loss_path.count("L") == 5
    markers = browser.find_elements(By.CSS_SELECTOR, "#eval-curves g.cf-markers")
    assert [m.get_attribute("data-name") for m in markers] == ["acc1"]
    assert markers[0].get_attribute("data-points") == "3"
    assert "kind: train" in browser.find_element(By.ID, "spec").text
    assert browser.find_element(By.ID, "stat-step").text == "30"

    open_page(browser, site, "/run?id=" + site["showcase"][1])
    assert series_points(browser, "chart-loss") == [120]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#eval-curves svg.cf-chart")) == 2
    screenshot(browser, site, "run")


def test_eval_job_page_shows_scores_and_bars_without_training_charts(browser, site):
    open_page(browser, site, "/run?id=demo/eval/suite")
    scores = [(label, ds, task, m, v) for label, ds, task, metrics in SUITE for m, v in metrics.items()
              if not m.startswith("n_")]
    rows = browser.execute_script("return [...document.querySelectorAll('#eval-table tbody tr')]"
                                  ".map((tr) => [...tr.cells].map((td) => td.textContent));")
    assert sorted(tuple(r[:4]) for r in rows) == sorted((label, ds, task, m) for label, ds, task, m, _ in scores)
    # One card of bars per (dataset, task), the two model labels side by side in each metric's group.
    cards = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.eval-task')].map((c) => [c.dataset.task, "
        "[...c.querySelectorAll('.bar')].map((b) => [b.dataset.group, b.dataset.series, Number(b.dataset.value)])]));")
    assert sorted(cards) == ["fashion_mnist · linear_probe", "fashion_mnist · zeroshot_classification",
                             "tuxpaint_heldout · zeroshot_retrieval"]
    assert cards["fashion_mnist · linear_probe"] == [["acc1", "untrained", 0.31], ["acc1", "trained", 0.44]]
    assert len(cards["fashion_mnist · zeroshot_classification"]) == 4  # acc1 and acc5, for both labels
    # No training charts and no x-axis picker: an eval job logs no training steps.
    assert not browser.find_elements(By.CSS_SELECTOR, "#curves, #eval-curves, #x-axis, svg.cf-chart")
    assert "spec.yaml" in browser.find_element(By.ID, "spec").text
    screenshot(browser, site, "eval")


def text_by_id(browser, element_id):
    return browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def test_live_run_updates_without_reload(browser, site):
    open_page(browser, site, "/run?id=live&poll=300")
    assert series_points(browser, "chart-loss") == [3]
    browser.execute_script("window.__sameDocument = 'yes';")
    with open(site["root"] / "live" / "metrics.jsonl", "a") as f:
        f.write("\n".join(metric_lines(2, first=4)) + "\n")
    WebDriverWait(browser, WAIT_S).until(lambda d: series_points(d, "chart-loss") == [5])
    assert browser.execute_script("return window.__sameDocument") == "yes"  # the page was not reloaded
    # Read through one script call: polling may swap the stats nodes between a lookup and a read.
    assert text_by_id(browser, "stat-step") == "25"
    assert "running" in text_by_id(browser, "status")


def test_scaling_page_shows_the_known_exponent(browser, site):
    metric = urllib.parse.quote(logged("ds", "acc1"))
    open_page(browser, site, f"/scaling?group=scaling&metric={metric}&target=0.3")
    alpha = float(browser.find_element(By.ID, "fit-alpha").get_attribute("data-alpha"))
    assert abs(alpha - KNOWN_ALPHA) < 0.01
    assert browser.find_element(By.ID, "fit-alpha").text.startswith(f"{alpha:.4f}"[:5])
    frontier = browser.find_element(By.CSS_SELECTOR,
                                    '#chart-scaling g.cf-markers[data-name="compute-optimal frontier"]')
    assert frontier.get_attribute("data-points") == "20"  # 5 decades x 4 bins
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-scaling polygon.cf-band")
    needed = float(browser.find_element(By.ID, "target-compute").get_attribute("data-compute"))
    beta = float(browser.find_element(By.ID, "fit-beta").get_attribute("data-beta"))
    assert beta * needed ** alpha == pytest.approx(0.3, rel=1e-6)
    screenshot(browser, site, "scaling")


def test_compare_page_overlays_runs(browser, site):
    open_page(browser, site, "/compare?ids=sweep/lr0,sweep/lr1,alpha")
    assert series_points(browser, "chart-compare") == [4, 4, 6]
    legend = browser.find_element(By.CSS_SELECTOR, "#chart-compare .legend").text
    assert "sweep-lr0" in legend and "alpha" in legend

    open_page(browser, site, "/compare?x=samples_seen&ids=" + ",".join(site["showcase"]))
    assert series_points(browser, "chart-compare") == [120, 120, 120]
    screenshot(browser, site, "compare")

    # Final eval scores side by side: a column per (run, model label), the untrained and trained models together.
    open_page(browser, site, "/compare?ids=demo/eval/suite,sweep/lr1")
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.ID, "compare-eval-table"))
    heads = browser.execute_script("return [...document.querySelectorAll('#compare-eval-table th[data-run]')]"
                                   ".map((th) => [th.dataset.run, th.dataset.model]);")
    assert heads == [["demo/eval/suite", "trained"], ["demo/eval/suite", "untrained"],
                     ["sweep/lr1", "training (best)"]]
    probe = browser.execute_script("return [...document.querySelectorAll('#compare-eval-table tbody tr')]"
                                   ".map((tr) => [...tr.cells].map((td) => td.textContent))"
                                   ".find((r) => r[1] === 'linear_probe');")
    assert probe == ["fashion_mnist", "linear_probe", "acc1", "0.44", "0.31", ""]


def test_sweep_page_charts_swept_values_against_a_metric(browser, site):
    open_page(browser, site, "/sweep?id=showcase")
    rows = browser.execute_script("return [...document.querySelectorAll('#sweep-table tbody tr')]"
                                  ".map((tr) => tr.dataset.dir);")
    assert rows == [r.split("/")[1] for r in site["showcase"]]
    markers = browser.find_element(By.CSS_SELECTOR, "#chart-sweep g.cf-markers")
    assert markers.get_attribute("data-points") == "3"
    browser.get(site["url"] + "/sweep?id=evals")  # a plain folder: no sweep page
    WebDriverWait(browser, WAIT_S).until(lambda d: "not a sweep" in d.find_element(By.ID, "page").text)


def test_try_page_scores_captions_with_a_checkpoint(browser, site, tmp_path):
    import torch
    from PIL import Image

    from clipforge.models import create_model
    from clipforge.models.spec import ModelSpec

    image_path = tmp_path / "red.png"
    Image.new("RGB", (48, 48), (220, 30, 30)).save(image_path)
    captions = ["a red square", "a green circle", "a photo of a cat"]

    open_page(browser, site, "/try?checkpoint=" + site["checkpoint"])
    assert browser.find_element(By.ID, "checkpoint").get_attribute("value") == site["checkpoint"]
    browser.find_element(By.ID, "image").send_keys(str(image_path))
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "preview").get_attribute("hidden") is None)
    browser.find_element(By.ID, "captions").send_keys("\n".join(captions))
    browser.find_element(By.ID, "score").click()
    WebDriverWait(browser, WAIT_S * 2).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#probabilities .bar"))
    bars = browser.find_elements(By.CSS_SELECTOR, "#probabilities .bar")
    shown = {b.get_attribute("data-caption"): float(b.get_attribute("data-probability")) for b in bars}
    assert set(shown) == set(captions) and sum(shown.values()) == pytest.approx(1.0, abs=1e-6)

    # The same numbers straight from the checkpoint.
    bundle = create_model(ModelSpec(name="tiny", checkpoint=str(site["root"] / site["checkpoint"])))
    with torch.no_grad():
        pixels = bundle.preprocess_val(Image.open(image_path).convert("RGB"))[None]
        img = bundle.model.encode_image(pixels, normalize=True)
        txt = bundle.model.encode_text(bundle.tokenizer(captions), normalize=True)
        probs = (bundle.model.logit_scale.exp() * img @ txt.T).softmax(-1)[0].tolist()
    for caption, p in zip(captions, probs):
        assert shown[caption] == pytest.approx(p, abs=1e-5)
    screenshot(browser, site, "try")
