"""The neuron viewer, the static export and the report, on a real run of the embedded model whose corpus
holds HTML (so escaping is tested on real tokens); and the viewer in JupyterLab in headless Chromium."""

from __future__ import annotations

import copy
import html
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pytest
from servers import free_port

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.config import RunConfig
from nbutils.core.records import Excerpt, UnitRecord
from nbutils.explain.stage import run_explain_stage
from nbutils.live.widget import NeuronViewer, export_html
from nbutils.score.stage import run_score_stage
from nbutils.view import plots
from nbutils.view.render import explanation_html, heatmap_html, neuron_html, neuron_scale, run_html
from nbutils.view.runview import RunView, ScoreTable
from nbutils.view.tables import table_html

SCRIPT = "<script>alert('x')</script> "
ARTIFACTS = Path(
    os.environ.get("NBUTILS_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "outputs" / "test-artifacts")
)


@pytest.fixture(scope="module")
def run_dir(embedded, tmp_path_factory):
    texts = [SCRIPT + t for t in load_texts("embedded")[:300]]
    excerpts = make_excerpts(embedded.tokenizer, texts, 32, 128, seed=1, corpus="script-test")
    run = tmp_path_factory.mktemp("run")
    cfg = CollectConfig(
        layers=[1, 4], neurons=list(range(6)), top_k=6, n_random=6, band_size=2, quantile_warmup=16, batch_size=32
    )
    collect_activations(embedded, excerpts, run / "01_collect", cfg, progress=False)
    config = RunConfig(explain_neurons=[[1, 0], [4, 2]], n_boot=50)
    run_explain_stage(run / "01_collect", run / "02_explain", config, progress=False)
    run_score_stage(run / "01_collect", run / "02_explain", run / "03_score", config, progress=False)
    return run


def _visible_text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_an_explanation_is_quoted_once():
    from nbutils.view.tables import quoted_html

    assert quoted_html(' "the" after a number ') == "\u201c&quot;the&quot; after a number\u201d"  # no "" at the start
    assert (
        quoted_html('"of"') == "&quot;of&quot;" and quoted_html("\u201cof\u201d") == "\u201cof\u201d"
    )  # quoted already
    assert (
        quoted_html("<b>dates</b>") == "\u201c&lt;b&gt;dates&lt;/b&gt;\u201d"
        and quoted_html('"') == "\u201c&quot;\u201d"
    )


def test_tokens_and_llm_text_are_escaped():
    out = heatmap_html(["<script>", "a&b", '"q"'], [1.0, 0.0, -1.0], 1.0)
    assert "<script" not in out and "&lt;script&gt;" in out
    assert _visible_text(out) == '<script>a&b"q"'  # shows literally
    from nbutils.core.results import BaselineExplanation, Candidate, ExplanationEntry

    text = "<img src=x onerror=alert(1)>"
    entry = ExplanationEntry(0, 1, "positive", text, candidates=[Candidate(text, "<b>reply")],
                             baseline=BaselineExplanation("</table>"))  # fmt: skip
    shown = explanation_html(entry)
    assert "<img" not in shown and "&lt;img src=x" in shown and "&lt;/table&gt;" in shown


def test_colour_scale_is_fixed_diverging_and_in_tooltips():
    out = heatmap_html(["a", "b", "c", "d"], [2.0, -1.0, 8.0, 0.0], scale=4.0)
    spans = re.findall(r'<span title="([^"]+)"(?: style="background:([^"]+)")?>', out)
    assert [t for t, _ in spans] == ["2", "-1", "8", "0"]
    assert spans[0][1] == "rgba(255,140,0,0.50)"  # positive: orange, alpha = |value| / scale
    assert spans[1][1] == "rgba(30,110,255,0.25)"  # negative: blue
    assert spans[2][1] == "rgba(255,140,0,1.00)"  # clipped at the scale
    flat = heatmap_html(["a"], [0.0], scale=0.0)  # a constant neuron: no colour at all
    assert "style=" not in flat


def _record(values: list[list[float]]) -> UnitRecord:
    from nbutils.core.units import UnitId

    ex = [Excerpt([f"t{i}" for i in range(len(v))], np.array(v)) for v in values]
    flat = np.concatenate([np.array(v) for v in values]) if values else np.zeros(1)
    return UnitRecord(
        id=UnitId(0, 0), top=ex, random=ex[:1], bands=[ex[:1]], band_quantiles=[(0.0, 0.5)], band_edges=[0.0, 1.0],
        mean=float(flat.mean()), variance=float(flat.var()), skewness=0.0, kurtosis=0.0,
        max=float(flat.max()), min=float(flat.min()),
    )  # fmt: skip


class _OneRecordView(RunView):
    """A real run's view whose neuron (0, 0) is replaced by a constructed record (constant or empty)."""

    def __init__(self, base: RunView, record: UnitRecord) -> None:
        super().__init__(base.store, usage_files=base.usage_files)
        self._rec = record

    def record(self, layer, neuron):
        return self._rec


def test_constant_and_empty_neurons_render(run_dir):
    base = RunView.open(run_dir)
    constant = _record([[0.0, 0.0], [0.0, 0.0]])
    assert neuron_scale(constant) == 0.0
    out = neuron_html(_OneRecordView(base, constant), 0, 0)
    assert "never varied" in out and "background" not in out.split("Top-activating")[1]
    empty = _record([])
    empty.top, empty.random, empty.bands = [], [], [[]]
    out = neuron_html(_OneRecordView(base, empty), 0, 0)
    assert "Not explained yet" in out and "Top-activating" not in out


def test_neuron_view_of_a_real_run(run_dir):
    view = RunView.open(run_dir)
    out = neuron_html(view, 1, 0)
    assert 'data-layer="1" data-neuron="0"' in out
    assert "<script" not in out and "&lt;" in out  # corpus HTML shown escaped
    assert "True versus simulated" in out and "token-lookup baseline" in out
    result = view.scores[(1, 0, "positive")]
    shown = _visible_text(out)
    for task in ("detection", "fuzzing"):  # the new scores beside the correlations, explanation and baseline
        assert f"{task} balanced accuracy" in shown and f"{task} AUROC" in shown
        for who in (result, result.baseline):
            m = who.of(task).balanced_accuracy
            assert (f"{m.value:.3f}" if m.value is not None else f"undefined: {m.reason}") in shown
    assert "stratified" in shown and f"{result.of('detection').n_positive} positive" in shown
    assert "fuzzing items" in shown and "<u style=" in out  # judged items, marked tokens underlined
    rec = view.record(1, 0)
    scale = neuron_scale(rec)
    alphas = [float(a) for a in re.findall(r"rgba\((?:255,140,0|30,110,255),([0-9.]+)\)", out)]
    assert max(alphas) == 1.0 and scale == pytest.approx(max(abs(rec.max), abs(rec.min)))
    unexplained = neuron_html(view, 4, 5)
    assert "Not explained yet" in unexplained and "Top-activating excerpts" in unexplained
    # what it writes: the stored tokens in order, escaped, with their logit changes
    assert "What it writes" in shown
    promoted = rec.writes["promotes"]
    row = re.search(r"<th>promotes</th><td[^>]*>(.*?)</td>", out).group(1)
    assert _visible_text(row).split(" +")[0] == promoted[0][0].replace("\n", "\u21b5")
    assert f"{promoted[0][1]:+.2f}" in _visible_text(row) and "<script" not in row


def test_widget_wiring(run_dir):
    viewer = NeuronViewer(run_dir)
    assert viewer.sort.value.startswith("score")  # scored runs open in score order
    first = viewer.html.value
    viewer.layer.value, viewer.neuron.value = 4, 3
    assert viewer.current == (4, 3, "positive") and 'data-neuron="3"' in viewer.html.value
    assert viewer.html.value != first
    viewer.next.click()
    after_next = viewer.current
    viewer.previous.click()
    assert viewer.current == (4, 3, "positive") or viewer.current != after_next
    viewer.filter.value = "zzz-no-such-text"
    assert viewer.status.value.count("0 neurons")
    explained = RunView.open(run_dir).explanations[(1, 0, "positive")].explanation
    viewer.filter.value = explained[:12]
    assert (viewer.current[0], viewer.current[1]) in {(1, 0), (4, 2)}
    viewer.sort.value = "layer, neuron"
    viewer.filter.value = ""
    assert viewer.current == (1, 0, "positive")
    viewer.neuron.value = 99  # collected neurons are 0..5: a clear message, not an exception
    assert "not" in viewer.html.value.lower()


def test_live_panels_on_the_unit_shown(run_dir):
    viewer = NeuronViewer(run_dir, layer=1, neuron=0)
    p = viewer.panels
    p.text.value = SCRIPT + "The meeting moved to March."
    p.show_text.click()
    shown = p.text_out.value
    assert 'data-kind="live"' in shown and "<script>" not in shown and SCRIPT.strip() in _visible_text(shown)
    assert "fire most on it" in shown and p.top_units.children  # the run's top units, as buttons
    viewer.show(4, 2)
    assert p.text_out.value == "" and not p.top_units.children  # another unit: the last one's results are gone
    p.show_text.click()
    target = p.top_units.children[-1]
    target.click()  # opens that unit in the viewer
    assert f"L{viewer.current[0]} N{viewer.current[1]}" == target.description
    viewer.show(1, 0)
    assert not p.explanation.continuous_update  # the box's text reaches the kernel whole, before the click
    p.explanation.value = SCRIPT + "numbers and digits"
    p.score.click()  # the simulation score first
    scored = p.score_out.value
    assert "scored now" in scored and "top+random" in scored and "token-lookup baseline" in scored
    assert "stage 03&#x27;s explanation" in scored or "stage 03's explanation" in scored  # the stored one beside
    assert "<script>" not in scored and "True versus simulated" in scored
    assert f"layer 1, unit 0: \u201c{html.escape(SCRIPT.strip())}" in scored  # the text it scored, escaped
    assert "detection" not in _visible_text(scored)
    p.every_scorer.value = True  # then detection and fuzzing, on request
    p.score.click()
    assert "detection" in _visible_text(p.score_out.value)
    viewer.filter.value = "no explanation says this"  # a filter that matches nothing: no unit, no stale results
    assert "No neuron matches the filter" in viewer.html.value and "scored now" not in p.score_out.value
    p.score.click()
    assert "No unit is shown" in p.score_out.value
    viewer.filter.value = ""
    assert 'class="nbx-neuron"' in viewer.html.value
    p.steer.click()  # ticked by default: the intervention score's shift, found by its target KL
    assert "steered by" in p.steer_out.value and "next-token distributions by KL" in p.steer_out.value
    assert p.strength.disabled
    p.by_kl.value = False
    assert not p.strength.disabled
    p.prompt.value, p.strength.value = "I went to the", 6.0
    p.steer.click()
    assert "as it is" in p.steer_out.value and "strength 6 x the unit" in p.steer_out.value
    p.strength.value = 0.0  # no shift at all: not the default shift
    p.steer.click()
    assert "steered by +0 (strength 0 x" in p.steer_out.value and "did not change" in p.steer_out.value
    p.text.value = "   "
    p.show_text.click()
    assert "The text is empty" in p.text_out.value and not p.top_units.children
    p.explanation.value = ""
    p.score.click()
    assert "The explanation is empty" in p.score_out.value and "Traceback" not in p.score_out.value


def test_static_export_is_self_contained(run_dir, tmp_path):
    one = export_html(run_dir, tmp_path / "n.html", [(1, 0)]).read_text()
    whole = export_html(run_dir, tmp_path / "run.html").read_text()
    for text in (one, whole):
        assert text.startswith("<!DOCTYPE html>") and "<script" not in text
        assert not re.search(r"(src|href)=['\"]?(https?:|//)", text)  # nothing fetched from a network
    assert whole.count('class="nbx-neuron"') == 2 and "href='#L1-N0-positive'" in whole
    one_shown = run_html(RunView.open(run_dir), page_units=1)
    assert one_shown.count('class="nbx-neuron"') == 1 and "Full detail below for 1 of these 2" in one_shown
    assert one_shown.count("<a href='#L") == 1 and "L1 N0" in one_shown and "L4 N2" in one_shown  # one linked


def test_report_figures_and_tables(run_dir, tmp_path):
    view = RunView.open(run_dir)
    paths = plots.write_report(view, tmp_path)
    # no output-side figure: this run has no ablation or intervention scores, so it is said, not drawn
    assert sorted(paths) == ["classification_scores", "score_by_layer", "score_distributions", "simulated_vs_true"]
    assert "No figure: no ablation" in plots.output_side_scores(view)._repr_html_()
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths.values())
    rows = plots.layer_rows(view)
    assert {r["layer"] for r in rows} == {1, 4} and all(r["n"] == 1 for r in rows if "top+random" in r["series"])
    judged = plots.classification_rows(view)
    assert {(r["task"], r["metric"], r["of"]) for r in judged} >= {
        (t, m, w)
        for t in ("detection", "fuzzing")
        for m in ("balanced accuracy", "F1")
        for w in ("explanation", "baseline")
    }
    bal = [r for r in judged if (r["task"], r["metric"], r["of"]) == ("detection", "balanced accuracy", "explanation")]
    values = [view.scores[k].of("detection").balanced_accuracy.value for k in view.scores]
    assert bal[0]["mean"] == pytest.approx(np.mean([v for v in values if v is not None]))
    assert any(r["series"] == "explanation, stratified" for r in rows)
    summary = {r["item"]: r["value"] for r in plots.run_summary(view)}
    assert "mean detection balanced accuracy, explanation" in summary
    assert summary["explanations (neuron sides)"] == 2 and summary["neurons collected"] == 12
    usage = plots.usage_rows(view)
    assert [r["stage"] for r in usage] == ["02_explain", "03_score"] and all(r["requests sent"] > 0 for r in usage)
    assert {r["request cache"] for r in usage} == {"not used by this backend"}  # the local backend: not "0/0 hits"
    writes = {(r["layer"], r["neuron"]): r for r in plots.writes_rows(view)}
    assert set(writes) == {(1, 0), (4, 2)}
    assert writes[(4, 2)]["raises"].startswith(repr(view.record(4, 2).writes["promotes"][0][0]))
    m, lo, hi = plots.mean_interval(np.array([0.0, 1.0, 2.0, 3.0]))
    assert m == 1.5 and 0.0 <= lo < m < hi <= 3.0
    # above BOOTSTRAP_MAX the normal interval stands in for the bootstrap's: the same bounds on skewed values
    big = np.random.default_rng(1).exponential(size=plots.BOOTSTRAP_MAX + 1)
    m, lo, hi = plots.mean_interval(big)
    boot = big[np.random.default_rng(2).integers(0, len(big), (2000, len(big)))].mean(1)
    assert m == big.mean() and hi - lo == pytest.approx(2 * 1.96 * big.std(ddof=1) / np.sqrt(len(big)), rel=1e-4)
    assert [lo, hi] == pytest.approx(np.quantile(boot, [0.025, 0.975]).tolist(), abs=0.006)
    # one unit per layer here: its number is no mean with an interval, and tables say "-" rather than nan
    assert all(r["n"] >= 1 for r in rows) and all(np.isnan([r["low"], r["high"]]).all() for r in rows if r["n"] == 1)
    scorer_table = table_html(plots.scorer_rows(view)) + table_html(rows)
    assert not re.search(r"\bnan\b", scorer_table, re.I)
    assert all(r["chance"] is None for r in plots.scorer_rows(view) if r["scorer"] == "simulation")


def test_a_run_keeps_expected_values_not_distributions_by_default(run_dir):
    from nbutils.interop.neuron_explainer import to_openai_results

    view = RunView.open(run_dir)
    for key in view.scores:
        details = view.simulation(key)
        excerpts = details.of("simulation").excerpts
        assert excerpts and all(x.distribution is None and len(x.expected) == len(x.true) for x in excerpts)
        assert all("distribution" not in x for x in details.to_dict()["simulation"]["excerpts"])  # not written
        seqs = to_openai_results(details)["scored_explanations"][0]["scored_simulation"]["scored_sequence_simulations"]
        for seq, x in zip(seqs, details.of("simulation").valid()):
            # neuron-explainer's fields hold a point mass at each expected value: its mean is the stored one
            means = [sum(v * q for v, q in zip(vs, qs)) for vs, qs in zip(seq["simulation"]["distribution_values"],
                                                                      seq["simulation"]["distribution_probabilities"])]  # fmt: skip
            assert means == pytest.approx(x.expected) == seq["simulation"]["expected_activations"]


def test_researchers_tables_sort_and_group_as_dataframes(run_dir, tmp_path):
    import nbutils
    from nbutils.score.contract import scorer
    from nbutils.view.tables import label

    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "run-x").symlink_to(run_dir)
    view = nbutils.open_run(tmp_path / "outputs" / "latest")  # the newest run, as the notebooks open it
    df = view.scores_frame()
    assert list(df.columns[:4]) == ["layer", "neuron", "sign", "explanation"] and list(df.columns[-2:]) == [
        "failure", "notes"
    ]  # fmt: skip
    assert len(df) == 2 and sorted(zip(df.layer, df.neuron, df.sign)) == view.keys()
    sim, det = scorer("simulation"), scorer("detection")
    corr, bal = label(sim, sim.columns[0]), label(det, det.columns[0])
    assert list(df.columns).index(f"baseline {corr}") == list(df.columns).index(corr) + 1  # the baseline beside
    for key in view.keys():
        r = view.scores[key]
        got = df[(df.layer == key[0]) & (df.neuron == key[1]) & (df.sign == key[2])].iloc[0]
        want = r.of("simulation").top_and_random.correlation.value
        assert got[corr] == pytest.approx(want) if want is not None else np.isnan(got[corr])
        base = r.baseline.of("simulation").top_and_random.correlation.value
        assert got[f"baseline {corr}"] == pytest.approx(base) if base is not None else np.isnan(got[f"baseline {corr}"])
        want = r.of("detection").balanced_accuracy.value
        assert got[bal] == pytest.approx(want) if want is not None else np.isnan(got[bal])
        assert got["explanation"] == r.explanation
    numbers = [c for c in df.columns if c not in ("layer", "neuron", "sign", "explanation", "failure", "notes")]
    assert all(df[c].dtype == np.float64 for c in numbers)
    best = df.sort_values(corr, ascending=False).iloc[0]
    assert (best.layer, best.neuron, best.sign) == view.ranked()[0][1]
    assert sorted(df.groupby("layer")[corr].mean().index) == [1, 4]
    ex = view.explanations_frame()
    assert list(ex.explanation) == [view.explanations[k].explanation for k in sorted(view.explanations)]
    assert (ex.candidates >= 1).all() and ex.notes.map(type).eq(str).all()


# --------------------------------------------------------------------------------------------------------
# A real browser: JupyterLab on localhost, the inspect notebook in headless Chromium (Debian's, no download)
# --------------------------------------------------------------------------------------------------------


def _stage_notebook(name: str, path: Path, **params) -> None:
    """A copy of a stage notebook whose parameters cell ends with the given values (as a user would edit it)."""
    nb = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / name, 4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# set by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nbformat.write(nb, path)


def _run_all_cells(driver, wait) -> None:
    """Run every cell of the notebook shown, through the menu, once its kernel has started (retried until the
    first code cell has run: a click before the kernel is ready does nothing)."""
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    active = ".jp-NotebookPanel"  # the only notebook open in its workspace
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"{active} .jp-Notebook .jp-Cell")))
    item = "//div[contains(@class,'lm-Menu-itemLabel') and text()='Run All Cells']"
    dialogs: list[str] = []
    for _ in range(20):
        # a JupyterLab dialog (kernel choice, file changed on disk, ...) blocks every click: accept it, keep its text
        for dialog in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog"):
            dialogs.append(dialog.text.replace("\n", " | "))
            buttons = dialog.find_elements(By.CSS_SELECTOR, ".jp-Dialog-button.jp-mod-accept")
            if buttons:
                buttons[0].click()
            else:
                driver.execute_script("arguments[0].remove()", dialog)
            time.sleep(0.5)
        try:
            driver.find_element(By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel') and text()='Run']").click()
            wait.until(ec.element_to_be_clickable((By.XPATH, item))).click()
        except ElementClickInterceptedException:  # a dialog opened since the look above: the next round accepts it
            time.sleep(0.5)
            continue
        for _ in range(20):
            prompt = driver.find_elements(By.CSS_SELECTOR, f"{active} .jp-CodeCell .jp-InputArea-prompt")[0].text
            if re.search(r"\[[0-9*]+\]", prompt):
                return
            time.sleep(0.5)
    raise AssertionError(f"the notebook's cells never ran; dialogs seen: {dialogs}")


@pytest.mark.skipif(bool(os.environ.get("NBUTILS_SKIP_BROWSER")), reason="NBUTILS_SKIP_BROWSER is set")
def test_viewer_in_jupyterlab_in_headless_chromium(run_dir, tmp_path):
    if not (shutil.which("chromedriver") and shutil.which("chromium")):
        pytest.fail("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _stage_notebook("04_inspect_neurons.ipynb", tmp_path / "inspect.ipynb", run_dir=str(run_dir), layer=1, neuron=0,
                    output_dir=str(tmp_path / "inspect-out"))  # fmt: skip
    _stage_notebook("05_report.ipynb", tmp_path / "report.ipynb", run_dir=str(run_dir),
                    output_dir=str(tmp_path / "report-out"))  # fmt: skip
    port, token = free_port(), "nbutils-test"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1"]
    cmd += [f"--ServerApp.token={token}", f"--ServerApp.root_dir={tmp_path}", "--LabApp.news_url=None"]
    lab = subprocess.Popen(cmd, stdout=open(tmp_path / "lab.log", "w"), stderr=subprocess.STDOUT)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
    ):
        options.add_argument(arg)
    driver = None
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.get(f"http://127.0.0.1:{port}/lab/tree/inspect.ipynb?token={token}")
        wait = WebDriverWait(driver, 180)
        _run_all_cells(driver, wait)
        section = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, ".nbx-neuron[data-layer='1'][data-neuron='0']"))
        )
        heat = section.find_elements(By.CSS_SELECTOR, ".nbx-excerpt[data-kind='top'] span")
        assert heat and heat[0].get_attribute("title")  # the heatmap is there, values in tooltips
        assert "<script>" in section.text  # corpus HTML shows literally
        controls = driver.find_elements(By.CSS_SELECTOR, ".widget-dropdown, .widget-inline-hbox")
        assert controls  # the ipywidgets controls rendered
        driver.execute_script("arguments[0].scrollIntoView()", controls[0])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "viewer_jupyterlab.png"))
        driver.execute_script("arguments[0].scrollIntoView()", section)
        assert driver.save_screenshot(str(ARTIFACTS / "viewer_jupyterlab_neuron.png"))

        # the live panels: type into each, press its button, and read what appears
        def tab(title: str) -> None:
            driver.find_element(By.XPATH, f"//div[contains(@class,'lm-TabBar-tabLabel') and text()='{title}']").click()

        def press(label: str) -> None:
            buttons = driver.find_elements(By.XPATH, f"//button[contains(@class,'widget-button') and text()='{label}']")
            next(b for b in buttons if b.is_displayed()).click()

        def typed(css: str, text: str) -> None:
            box = next(e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed())
            box.clear()
            box.send_keys(text)

        typed(".widget-textarea textarea", "<script>alert(2)</script> The meeting moved to March.")
        press("show")
        live = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".nbx-excerpt[data-kind='live']")))
        assert "<script>alert(2)</script>" in live.text  # typed HTML shows literally
        driver.execute_script("arguments[0].scrollIntoView()", live)
        assert driver.save_screenshot(str(ARTIFACTS / "viewer_try_a_text.png"))
        tab("Test an explanation")
        typed(".widget-text input[placeholder='your explanation of this unit']", "<b>numbers</b> and digits")
        press("score")
        wait.until(lambda d: "scored now" in d.find_element(By.CSS_SELECTOR, ".jp-Notebook").text)
        panel = driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
        assert "<b>numbers</b> and digits" in panel and "token-lookup baseline" in panel
        assert driver.save_screenshot(str(ARTIFACTS / "viewer_test_an_explanation.png"))
        tab("Steer")
        press("steer")
        wait.until(lambda d: "as it is" in d.find_element(By.CSS_SELECTOR, ".jp-Notebook").text)
        assert driver.save_screenshot(str(ARTIFACTS / "viewer_steer.png"))

        # the report notebook, run live, shows its figures as images (not "<Figure size ...>" text)
        driver.get(f"http://127.0.0.1:{port}/lab/workspaces/report/tree/report.ipynb?token={token}")  # its own tab
        _run_all_cells(driver, wait)
        shown = ".jp-NotebookPanel .jp-OutputArea-output img"
        try:
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, shown)) >= 4)  # no output-side scores here
        except Exception:
            driver.save_screenshot(str(ARTIFACTS / "report_jupyterlab_failed.png"))
            raise
        images = driver.find_elements(By.CSS_SELECTOR, shown)
        assert all(driver.execute_script("return arguments[0].naturalWidth", i) > 300 for i in images)
        notebook_text = driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
        assert "<Figure size" not in notebook_text and "No figure: no ablation or intervention scores" in notebook_text
        driver.execute_script("arguments[0].scrollIntoView()", images[0])
        assert driver.save_screenshot(str(ARTIFACTS / "report_jupyterlab.png"))
    finally:
        if driver is not None:
            driver.quit()
        lab.terminate()
        lab.wait(timeout=30)


def test_weak_results_flag_themselves_in_the_viewer_the_page_and_the_report(run_dir):
    from nbutils.llm.prompts import WORKED_EXAMPLES

    view = RunView.open(run_dir)
    view.explanations, view.scores = dict(view.explanations.items()), dict(view.scores.items())  # edited below
    copied = WORKED_EXAMPLES[0].explanation + ", mostly in dates"
    for key in view.explanations:  # both explanations copy the prompt's first worked example, so they repeat
        view.explanations[key].explanation = copied
    key = (1, 0, "positive")
    det = view.scores[key].of("detection")
    answered = det.n_positive + det.n_negative - det.n_unanswered
    det.n_yes = answered  # as if the judge had said yes to every item
    shown = _visible_text(neuron_html(view, 1, 0))
    assert "copies worked example 1 of the prompt" in shown and "same as the explanation of 1 other neuron" in shown
    assert f"degenerate judge: answered yes to all {answered} items" in shown
    assert "(always-yes " in shown  # F1 stands beside its chance level
    raw = run_html(view)
    page = _visible_text(raw)
    assert page.count("copies worked example 1") == 2 and "degenerate judge" in page  # each neuron's section
    # the index table: a marker in each cell (its notes in the tooltip), each kind explained once in its legend
    assert page.count("copies worked example N of the prompt (2 cells)") == 1
    assert raw.count('title="copies worked example 1 of the prompt') == 2
    notes = plots.note_rows(view)
    assert {(r["layer"], r["neuron"], r["result"]) for r in notes} >= {
        (1, 0, "explanation"),
        (1, 0, "explanation detection"),
    }
    summary = {r["item"]: r["value"] for r in plots.run_summary(view)}
    assert summary["explanations copying a worked example of the prompt"] == "2 of 2"
    assert summary["explanations the same as another neuron's"] == "2 of 2"
    rows = plots.classification_rows(view)
    f1 = next(r for r in rows if (r["task"], r["metric"], r["of"]) == ("detection", "F1", "explanation"))
    chances = [r.of("detection").f1_chance.value for r in view.scores.values() if r.of("detection")]
    assert f1["chance"] == pytest.approx(np.mean(chances))
    assert all(r["chance"] == 0.5 for r in rows if r["metric"] != "F1")


def _widened(run_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The run with every collected unit scored: the two real results copied onto all 12 units' keys, each
    with its own top+random correlation (unit i of layer l: (l * 6 + i) / 100), written through the store."""
    from nbutils.core.store import ResultStore
    from nbutils.score.stage import stored_numbers

    run = tmp_path / "wide"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("04_*", "05_*"))
    values = {}
    for stage in ("02_explain", "03_score"):
        store = ResultStore(run / stage)
        template = [(e, store.details((e["layer"], e["neuron"], e["sign"]))) for e in store.entries()]
        items = []
        for i, (layer, unit) in enumerate((lay, u) for lay in (1, 4) for u in range(6)):
            e, d = template[i % 2]
            e = {**e, "layer": layer, "neuron": unit, "explanation": f"unit {layer}/{unit} fires on text"}
            if stage == "03_score":
                e = copy.deepcopy(e)
                values[(layer, unit, "positive")] = e["simulation"]["top_and_random"]["correlation"]["value"] = (
                    layer * 6 + unit
                ) / 100
                if (layer, unit) == (1, 1):  # a judge that said yes to every item: its numbers carry notes
                    det = e["detection"]
                    det["n_yes"] = det["n_positive"] + det["n_negative"] - det["n_unanswered"]
            items.append((e, d, stored_numbers(e) if stage == "03_score" else None))
        store.put_many(items)
        store.close()
    return run, values


def test_views_read_only_what_they_show(run_dir, tmp_path, monkeypatch):
    from nbutils.core.store import ResultStore

    run, values = _widened(run_dir, tmp_path)
    read = []
    original = ResultStore.entries
    monkeypatch.setattr(ResultStore, "entries", lambda self, *a, **k: read.append(self.root.name) or original(self))
    view = RunView.open(run)
    viewer = NeuronViewer(view)  # sorted by score: the best unit first
    assert viewer.current == (4, 5, "positive") and 'class="nbx-neuron"' in viewer.html.value
    viewer.step(1)
    assert viewer.current == (4, 4, "positive")
    assert view.neuron_ids("score: worst first")[:2] == [(1, 0), (1, 1)]
    assert view.neuron_ids("layer, neuron", "unit 4/") == [(4, u) for u in range(6)]
    assert [k for _, k in view.ranked()] == sorted(values, key=lambda k: -values[k])
    table = view.score_table  # the report's numbers, from the store's numbers and flags
    assert read == []  # none of that parsed every entry: the store's index and explanation column answered
    parsed = ScoreTable.build(view.scores.items(), view.scorers)  # the same, from every parsed result
    assert table.keys == parsed.keys and np.array_equal(table.failed, parsed.failed)
    for got, want in ((table.values, parsed.values), (table.noted, parsed.noted), (table.degenerate,
                      parsed.degenerate), (table.f1_chance, parsed.f1_chance)):  # fmt: skip
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k], equal_nan=True) for k in want)
    assert table.degenerate[("explanation", "detection", 0)][table.keys.index((1, 1, "positive"))]
    assert np.isfinite(table.f1_chance[("explanation", "detection")]).all()
    read.clear()
    shown = run_html(view, page_units=4)
    assert read == []

    def detailed(page: str) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in re.findall(r'class="nbx-neuron" id="L(\d+)-N(\d+)-positive"', page)]

    assert detailed(shown)[:2] == [(4, 5), (1, 0)]  # the best, then the worst; then a seeded sample of the rest
    assert len(set(detailed(shown))) == 4 and detailed(run_html(view, page_units=4)) == detailed(shown)
    assert "Full detail below for 4 of these 12: the 1 best and the 1 worst" in _visible_text(shown)
    assert shown.count("<a href='#L") == 4 and all(f"L{k[0]} N{k[1]}" in shown for k in values)  # all in the table
    # a large run's page: the compact table, numbers from the index; only the detailed units' results are read
    from nbutils.view import render

    got = []
    original_get = ResultStore.get
    monkeypatch.setattr(ResultStore, "get", lambda self, key: got.append(key) or original_get(self, key))
    monkeypatch.setattr(render, "FULL_TABLE_MAX", 4)
    compact = run_html(view, page_units=4)
    assert read == [] and {k[:2] for k in got} <= set(detailed(compact))  # the 4 sections
    assert detailed(compact) == detailed(shown) and compact.count("<a href='#L") == 4
    rows = re.findall(r"<tr><td>(?:<a [^>]*>)?L(\d+) N(\d+)(?:</a>)? \+</td><td>([^<]*)</td><td>([^<]*)</td>", compact)
    assert len(rows) == 12 and {(int(a), int(b)) for a, b, _, _ in rows} == {k[:2] for k in values}
    for a, b, text, first in rows:  # each unit's explanation, and its top+random correlation to 3 digits
        assert text.startswith(f"unit {a}/{b} fires on text") and first.startswith(
            f"{values[(int(a), int(b), 'positive')]:.3g}"
        )
    assert "unit sides (+ positive, - negative)" in _visible_text(compact)


def test_a_stage_notebooks_table_shows_its_first_rows_and_says_how_many_were_left_out():
    from nbutils.view.tables import head_table_html

    rows_of = lambda xs: [{"unit": f"<b>{x}</b>"} for x in xs]  # noqa: E731
    small = head_table_html(rows_of, list(range(3)), limit=5)
    assert small.count("<tr>") == 4 and "left out" not in small and "of 3" not in small
    big = head_table_html(rows_of, list(range(1234)), limit=5)
    assert big.count("<tr>") == 6 and "The first 5 of 1,234 unit sides" in big and "&lt;b&gt;4&lt;/b&gt;" in big
    assert "<b>5</b>" not in big and "&lt;b&gt;5&lt;/b&gt;" not in big


def test_the_scores_frame_reads_the_notes_stage_03_stored_and_equals_the_decoded_results(
    run_dir, tmp_path, monkeypatch
):
    """Stage 03 stores the notes on each side's numbers beside them: the frame then decodes no result, and it
    equals the frame of the same store without them (every noted result decoded, as before)."""
    import sqlite3

    import pandas as pd

    from nbutils.core.store import ResultStore
    from nbutils.score.contract import UnitScores, number_notes, registered
    from nbutils.score.stage import stored_numbers

    run, _ = _widened(run_dir, tmp_path)  # its (1, 1) judge said yes to every item: notes on its numbers
    store = ResultStore(run / "03_score")
    scorers = registered()
    items = [(e, store.details((e["layer"], e["neuron"], e["sign"])), stored_numbers(e),
              number_notes(UnitScores.from_dict(e), scorers)) for e in store.entries()]  # fmt: skip
    store.put_many(items)
    store.close()
    decoded = []
    original = UnitScores.from_dict
    monkeypatch.setattr(UnitScores, "from_dict", classmethod(lambda cls, d: decoded.append(1) or original(d)))
    frame = RunView.open(run).scores_frame()
    assert decoded == [] and frame["notes"].str.contains("degenerate").any()
    with sqlite3.connect(run / "03_score" / "results.sqlite") as conn:
        conn.execute("DROP TABLE number_notes")  # as a store written before stage 03 stored them
    before = RunView.open(run).scores_frame()
    assert decoded  # this one read the noted results
    pd.testing.assert_frame_equal(frame, before)
