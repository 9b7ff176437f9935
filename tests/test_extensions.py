"""Extensions from another package (`nbutils.core.registry`): found through entry points in every process that
runs work, each with its own settings, checked before anything runs; and the errors a user meets on the way.

The end-to-end test installs the example package (``examples/nbutils_keyword``: an explainer, a scorer and a
unit type, each with a setting) with pip into a folder of its own, puts that folder on PYTHONPATH (as a user's
environment would hold it), and runs ``nbutils run`` with it on Ray; the other tests write a package's
dist-info by hand into a temporary folder on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nbutils.core.config import RunConfig
from nbutils.core.errors import UserError
from nbutils.core.registry import Registry
from nbutils.explain.contract import EXPLAINERS
from nbutils.llm.contract import BACKENDS
from nbutils.run.params import check_parameters, fold_extension_settings
from nbutils.run.pipeline import default_run_id
from nbutils.score.contract import SCORERS, Column, Scorer
from nbutils.subject.units import UNIT_TYPES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "nbutils_keyword"


# ----------------------------------------------------------------------------------------------------------
# A package written into a temporary folder: its module and its dist-info with entry points
# ----------------------------------------------------------------------------------------------------------

MODULE = """
from dataclasses import dataclass
from nbutils.score.contract import Column, Scorer
from nbutils.score.metrics import Metric

@dataclass(frozen=True)
class LengthSettings:
    per_word: float = 1.0

@dataclass
class Length:
    words: Metric

class LengthScorer(Scorer):
    name = "length"
    title = "words in the explanation, times per_word"
    columns = (Column("words", ("words",)),)
    result_type = Length
    settings_type = LengthSettings

    def baseline(self, ctx):
        return None

    def explanation(self, ctx, llm):
        return Length(Metric(len(ctx.entry.explanation.split()) * self.settings.per_word)), None
"""


def write_package(folder: Path, name: str, entry_points: str, module: str = MODULE) -> None:
    """A package as pip leaves it in site-packages: its module and ``<name>-0.1.dist-info`` with entry points."""
    (folder / f"{name}.py").write_text(module)
    info = folder / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A folder on sys.path holding packages written by the test; the registries read it again, and forget
    what they read from it afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    registries = (SCORERS, EXPLAINERS, BACKENDS, UNIT_TYPES)
    before = [(dict(r._entries), dict(r.origin)) for r in registries]
    yield tmp_path
    for r, (entries, origin) in zip(registries, before):
        r._entries, r.origin = entries, origin
    for module in ("length_pkg", "broken_pkg"):
        sys.modules.pop(module, None)


def test_an_installed_packages_scorer_is_found_with_its_settings(installed):
    write_package(installed, "length_pkg", "[nbutils.scorers]\nlength = length_pkg:LengthScorer\n")
    assert "length" not in SCORERS._entries  # read at first use; a running process reads again on request
    SCORERS.discover(again=True)
    assert SCORERS.origin["length"] == "package length_pkg" and SCORERS.origin["simulation"] == "built in"
    cls = SCORERS.resolve("length")
    assert issubclass(cls, Scorer) and cls.__module__ == "length_pkg"
    values = check_parameters(
        fold_extension_settings({"scorers": ["simulation", "length"], "scorer.length.per_word": 2})
    )
    assert values["extension_settings"] == {"scorer": {"length": {"per_word": 2}}}
    assert SCORERS.settings("length", values["extension_settings"]["scorer"]).per_word == 2.0
    # a setting is part of the run id; a run without settings keeps the id it had before settings existed
    without = check_parameters({"scorers": ["simulation", "length"]})
    assert "extension_settings" in without and default_run_id(values) != default_run_id(without)
    plain = {k: v for k, v in without.items() if k not in ("extension_settings", "explainer")}
    assert default_run_id(without) == default_run_id(plain)


def test_settings_come_from_dotted_names_and_yaml_sections_the_dotted_name_winning():
    folded = fold_extension_settings(
        {
            "scorer": {"keyword": {"min_fraction": 0.5, "other": 1}},
            "extension_settings": {"unit_type": {"strided_neurons": {"stride": 3}}},
            "scorer.keyword.min_fraction": 0.7,
            "explainer": "keyword",
            "top_k": 5,
        }
    )
    assert folded == {
        "explainer": "keyword",
        "top_k": 5,
        "extension_settings": {
            "scorer": {"keyword": {"min_fraction": 0.7, "other": 1}},
            "unit_type": {"strided_neurons": {"stride": 3}},
        },
    }


@pytest.mark.parametrize(
    "params, message",
    [
        ({"scorers": ["simulation", "lenght"]}, r"scorers='lenght' is not one of .*Did you mean 'length'\?.*length \(package "
         r"length_pkg\).*entry points in the group 'nbutils.scorers'"),
        ({"scorers": ["length"], "scorer.length.per_wrd": 2}, r"no setting 'per_wrd'. Did you mean 'per_word'\?"),
        ({"scorers": ["length"], "scorer.length.per_word": "two"}, r"scorer.length.per_word='two': expected a number"),
        ({"scorer.length.per_word": 2}, r"'length', which this run does not use.*scorers=\[simulation, length\]"),
        ({"scorr.length.per_word": 2}, r"'scorr.length.per_word' is not of the form <role>.<name>.<setting>"),
        ({"scorer.simulation.x": 1}, r"scorer 'simulation', which declares none"),
        ({"explainer": "keywrd"}, r"explainer='keywrd' is not one of 'llm', 'rules', 'triage'"),
        ({"explainer": "triage"}, r"explainer=triage .* llm_when='always' gives none"),
    ],
)  # fmt: skip
def test_bad_extension_input_is_refused_before_anything_runs(installed, params, message):
    write_package(installed, "length_pkg", "[nbutils.scorers]\nlength = length_pkg:LengthScorer\n")
    SCORERS.discover(again=True)
    with pytest.raises(UserError, match=message):
        check_parameters(params)


def test_a_package_whose_entry_point_cannot_be_imported_or_names_another_class(installed):
    broken = "[nbutils.scorers]\ngone = broken_pkg:Missing\nmisnamed = broken_pkg:Named\n"
    write_package(installed, "broken_pkg", broken, "from length_pkg import LengthScorer as Named\n")
    write_package(installed, "length_pkg", "[nbutils.scorers]\nlength = length_pkg:LengthScorer\n")
    SCORERS.discover(again=True)
    with pytest.raises(
        UserError, match=r"'gone' \(package broken_pkg\) points to 'broken_pkg:Missing', which cannot be"
    ):
        SCORERS.resolve("gone")
    with pytest.raises(UserError, match=r"registered as 'misnamed' \(package broken_pkg\) calls itself 'length'"):
        SCORERS.resolve("misnamed")


def test_a_package_cannot_take_a_built_in_name(installed):
    write_package(installed, "length_pkg", "[nbutils.scorers]\nsimulation = length_pkg:LengthScorer\n")
    with pytest.warns(UserWarning, match="declares a scorer named 'simulation', which is built in"):
        SCORERS.discover(again=True)
    assert SCORERS.resolve("simulation").__module__ == "nbutils.score.simulation"


def test_every_registry_of_a_role_reads_its_own_group():
    registries = {r.role: r for r in (SCORERS, EXPLAINERS, BACKENDS, UNIT_TYPES)}
    assert {role: r.group for role, r in registries.items()} == {
        "scorer": "nbutils.scorers", "explainer": "nbutils.explainers", "backend": "nbutils.backends",
        "unit_type": "nbutils.unit_types",
    }  # fmt: skip
    assert Registry("thing", {}).group is None  # a registry no package extends reads no entry points


@dataclass(frozen=True)
class _Settings:
    n: int = 1


class _WithSettings(Scorer):
    name = "with_settings"
    columns = (Column("n", ("n",)),)
    settings_type = _Settings

    def baseline(self, ctx):
        return None

    def explanation(self, ctx, llm):
        return None, None


def test_a_scorer_is_made_with_its_settings_or_their_defaults(monkeypatch):
    monkeypatch.setitem(SCORERS, "with_settings", _WithSettings)
    from nbutils.score.stage import chosen_scorers

    (made,) = chosen_scorers(
        RunConfig(scorers=["with_settings"], extension_settings={"scorer": {"with_settings": {"n": 3}}})
    )
    assert made.settings == _Settings(3)
    (default,) = chosen_scorers(RunConfig(scorers=["with_settings"]))
    assert default.settings == _Settings(1)


# ----------------------------------------------------------------------------------------------------------
# End to end: the example package installed with pip, used by `nbutils run` on Ray and by `open_run`
# ----------------------------------------------------------------------------------------------------------


def _mlp_input(model, layer: int, token_ids: list[int]) -> np.ndarray:
    """The input of a layer's MLP output projection for one sequence, read with a hook of this test's own."""
    import torch

    got = {}

    def keep(module, args, out) -> None:  # returns None: the output passes on unchanged
        got["x"] = args[0].detach()

    handle = model.model.layers[layer].mlp.down_proj.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(torch.tensor([token_ids]))
    finally:
        handle.remove()
    return got["x"][0].double().numpy()


@pytest.mark.slow
def test_the_example_package_runs_end_to_end_with_its_settings_in_every_process(tmp_path):
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(target), str(EXAMPLE)], check=True, capture_output=True, timeout=300)
    assert (target / "nbutils_keyword-0.1.0.dist-info" / "entry_points.txt").is_file()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    (tmp_path / "run.yaml").write_text(  # a dotted name and a section, beside plain parameters
        "scorers: [keyword]\nunits: strided_neurons\nexplainer.keyword.n_words: 2\n"
        "unit_type:\n  strided_neurons:\n    stride: 4\n"
    )
    args = ["-p", "explainer=keyword", "-p", "scorer.keyword.min_fraction=0.6", "-p", "n_excerpts=48",
            "-p", "layers=[0, 15]", "-p", "explain_neurons=2", "-p", "executor=ray", "-p", "shards=2"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "nbutils", "run", "--config", "run.yaml", *args, "--output-root", "out"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = (tmp_path / "out").iterdir()
    settings = {"explainer": {"keyword": {"n_words": 2}}, "scorer": {"keyword": {"min_fraction": 0.6}},
                "unit_type": {"strided_neurons": {"stride": 4}}}  # fmt: skip
    for stage in ("01_collect", "02_explain", "03_score"):  # recorded with the results
        assert json.loads((run / stage / "manifest.json").read_text())["parameters"]["extension_settings"] == settings
        if stage != "01_collect":  # (stage 01 records its own in collection.json, below)
            assert json.loads((run / stage / "parameters.json").read_text())["extension_settings"] == settings
    assert "the keyword explainer explained every unit" in done.stdout

    from nbutils.core.records import RecordStore
    from nbutils.core.store import ResultStore
    from nbutils.subject.loading import load_subject_model

    # the unit type (collected on Ray workers): unit i is MLP neuron 4 i, checked against a hook of our own
    store = RecordStore(run / "01_collect")
    assert store.meta.unit == {"kind": "strided_neurons", "settings": {"stride": 4}}
    model = load_subject_model("embedded").model
    assert len(store.neurons(0)) == -(-model.config.intermediate_size // 4)
    for layer, unit in ((0, 5), (15, 100)):
        top = store.record(layer, unit).top[0]
        values = _mlp_input(model, layer, top.token_ids)[:, unit * 4]
        np.testing.assert_allclose(top.activations, values, rtol=1e-4, atol=1e-4)
    # the explainer and the scorer, with their settings
    with ResultStore(run / "02_explain") as explained, ResultStore(run / "03_score") as scored:
        entries = [explained.get(k) for k in explained.chosen()]
        results = [scored.get(k) for k in scored.chosen()]
    assert len(entries) == 4 and all(e["explainer"] == "keyword" for e in entries)
    assert all(e["explanation"].startswith("the words ") and e["explanation"].count('"') <= 4 for e in entries)
    assert all(r["keyword"]["min_fraction"] == 0.6 and 0 <= r["keyword"]["recall"]["value"] <= 1 for r in results)
    assert (run / "05_report" / "figures" / "score_distributions.png").is_file()  # the report leads with its score
    # open_run in a process of its own: the run's recorded settings reach the live scorer
    live = subprocess.run(
        [sys.executable, "-c", f"import nbutils; run = nbutils.open_run({str(run)!r}); u = run.unit(0, 5); "
         "r = u.score('the words \"the\"'); sc = r.scorers[0]; print(sc.name, sc.settings.min_fraction, r.headline)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert live.returncode == 0, live.stderr[-3000:]
    name, fraction, headline = live.stdout.split()[-3:]
    assert (name, float(fraction)) == ("keyword", 0.6) and 0.0 <= float(headline) <= 1.0


def test_a_built_in_declares_its_settings_the_same_way():
    from nbutils.explain.contract import make_explainer
    from nbutils.explain.rules import RulesSettings

    given = {"explainer": {"rules": {"max_peaks": 2, "window": 8}}}
    made = make_explainer(RunConfig(explainer="rules", extension_settings=given))
    assert made.name == "rules" and made.settings == RulesSettings(max_peaks=2, window=8) and made.llm is None
    assert make_explainer(RunConfig(explainer_backend="rules")).settings == RulesSettings()  # the old name
    with pytest.raises(UserError, match=r"settings of the explainer 'rules' were refused: max_peaks, window and"):
        check_parameters({"explainer": "rules", "explainer.rules.window": 0})
