"""The parameter schema: every value is checked before anything runs, and the notebooks agree with it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from nbutils.core import config
from nbutils.core.config import RunConfig
from nbutils.core.errors import UserError
from nbutils.core.layout import STAGES
from nbutils.run import params
from nbutils.run.params import check_parameters, conforms, describe
from nbutils.run.pipeline import (
    declared_parameters,
    default_run_id,
    effective_parameters,
    load_config,
    notebooks_dir,
    parse_value,
)

PACKAGE = Path(__file__).resolve().parent.parent / "nbutils"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_excerpts": "abc"}, "n_excerpts='abc': expected an integer or null (None), got the string 'abc'"),
        ({"layers": [0, "x"]}, "expected a list of integers or null"),
        ({"temperature": True}, "expected a number"),  # a bool is not a number here
        ({"n_exerpts": 10}, "Unknown parameter 'n_exerpts': no stage takes it. Did you mean 'n_excerpts'?"),
        ({"explainer_backend": "opnai"}, "is not one of 'local', 'openai', 'oracle', 'rules'. Did you mean 'openai'?"),
        ({"scorers": ["simulation", "fuzing"]}, "scorers='fuzing' is not one of"),
        ({"explainer_backend": "vllm"}, "is not one of 'local', 'openai', 'oracle', 'rules'"),
        ({"explain_neurons": "strongest:x"}, 'is not "all" or "strongest:N"'),
        ({"explain_neurons": [[0, 1, 2]]}, "not [layer, neuron] pairs"),
        ({"llm_when": "rule_above:0.7"}, 'is not "always" or "rule_below:X"'),
        ({"llm_when": "rule_below:high"}, 'is not "always" or "rule_below:X"'),
        ({"llm_when": "rule_below:7"}, "with X a correlation in -1..1"),
        ({"output_dir": "/tmp/x"}, "set by the pipeline itself"),
        ({"model": "planted", "ablation": True}, "ablation scores compare the model's next-token predictions"),
        ({"model": "planted", "scorers": ["intervention"]}, "set intervention=false and leave them out of scorers"),
    ],
)
def test_bad_values_are_refused_with_the_fix(params, message):
    with pytest.raises(UserError) as err:
        check_parameters(params)
    assert message in str(err.value) and err.value.fix


def test_values_that_pass_and_are_normalised(tmp_path):
    out = check_parameters({"temperature": 1, "neurons": [1, 2], "site": {"module": "a.{layer}.b", "side": "input"}})
    assert out["temperature"] == 1.0 and isinstance(out["temperature"], float)
    assert out["n_excerpts"] == RunConfig().n_excerpts  # defaults filled in
    for text in ("None", "null", "~"):
        assert parse_value(text) is None
    assert parse_value("[0, 5]") == [0, 5] and parse_value("strongest:5") == "strongest:5"
    assert check_parameters({"explain_neurons": parse_value("strongest:5")})["explain_neurons"] == "strongest:5"
    assert check_parameters({"llm_when": parse_value("rule_below:0.7")})["llm_when"] == "rule_below:0.7"
    assert describe(list[list[int]] | None) == "a list of lists of integers or null (None)"
    assert conforms({"prompt": 1}, dict[str, float]) and not conforms({"prompt": "1"}, dict[str, float])


def test_relative_paths_are_resolved_from_the_folder_the_command_runs_in(tmp_path):
    (tmp_path / "corpus.txt").write_text("some text")
    (tmp_path / "rules.py").write_text("PLANTED = []\n")
    work = tmp_path / "sub"
    work.mkdir()
    out = check_parameters({"corpus": "../corpus.txt", "model": "planted:../rules.py"}, cwd=work)
    assert out["corpus"] == str(tmp_path / "corpus.txt") and out["model"] == f"planted:{tmp_path / 'rules.py'}"
    with pytest.raises(UserError, match=r"The corpus '\.\./missing\.txt' does not exist \(looked for .*/missing\.txt"):
        check_parameters({"corpus": "../missing.txt"}, cwd=work)
    with pytest.raises(UserError, match="model path './nope' does not exist"):
        check_parameters({"model": "./nope"}, cwd=work)
    with pytest.raises(UserError, match="does not exist"):
        check_parameters({"explainer_model": "/no/such/model.gguf"}, cwd=work)
    kept = check_parameters({"explainer_backend": "openai", "explainer_model": "org/some-model"}, cwd=work)
    assert kept["explainer_model"] == "org/some-model"  # a server's model name is not a path
    assert check_parameters({"corpus": "wikitext:wikitext-2-raw-v1"})["corpus"] == "wikitext:wikitext-2-raw-v1"


def test_yaml_config_errors_are_one_paragraph(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_excerpts: 10\nlayers: [0, 1\nseed: 3\n")
    with pytest.raises(UserError, match=r"bad\.yaml is not valid YAML at line \d+, column \d+: .* starts at line 2"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("neurons: None\nseed: 3\n")
    assert load_config(good) == {"neurons": None, "seed": 3}


# Run ids that commit 86f1ec2 (before extension settings and the explainer parameter existed) gave these
# parameter sets, as `nbutils run` prints them: the runs users already have keep their folders.
EARLIER_RUN_IDS = [
    ({}, None, "run-2781eac8"),  # the main job
    ({}, "quick", "run-cd02bac3"),
    ({"explainer_backend": "rules", "llm_when": "always"}, None, "run-adcbd594"),
]


@pytest.mark.parametrize("given, preset, earlier", EARLIER_RUN_IDS)
def test_runs_made_before_new_parameters_keep_their_ids(given, preset, earlier):
    values = effective_parameters(given, preset=preset)
    assert default_run_id(values) == earlier
    new = {"explainer": "llm", "extension_settings": {}}  # parameters added since, at their defaults
    assert {k: values[k] for k in new} == new
    assert default_run_id({k: v for k, v in values.items() if k not in new}) == earlier  # as the old code hashed
    assert default_run_id(effective_parameters({**given, "explainer": "rules"}, preset=preset)) != earlier


def test_a_finished_stage_of_an_earlier_run_is_still_found_finished(tmp_path):
    """A manifest written before a `when_set` parameter existed records the same parameters the chain now
    passes while it is unset; once set, the stage runs again."""
    from nbutils.core.layout import RunLayout
    from nbutils.run.manifests import stage_done
    from nbutils.run.pipeline import _stage_parameters, declared_parameters

    run, stage = RunLayout(tmp_path), STAGES[1]
    declared = declared_parameters(notebooks_dir() / stage.notebook)
    (tmp_path / "01_collect").mkdir()
    passed = _stage_parameters(stage, declared, effective_parameters({}), run)
    assert "explainer" not in passed and "extension_settings" not in passed
    earlier = {k: v for k, v in passed.items()}  # what a manifest of commit 86f1ec2 recorded
    manifest = run.manifest(stage)
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"parameters": earlier}))
    assert stage_done(manifest, run.summary(stage), passed)
    changed = _stage_parameters(stage, declared, effective_parameters({"explainer": "rules"}), run)
    assert changed["explainer"] == "rules" and not stage_done(manifest, run.summary(stage), changed)


def test_every_parameter_is_in_one_section_and_settings_are_taken_by_name():
    flat = [name for names in config.SECTIONS.values() for name in names]
    assert sorted(flat) == sorted(config.schema()) and len(flat) == len(set(flat))
    from nbutils.llm.contract import backend_spec
    from nbutils.score.contract import ScoreSettings
    from nbutils.score.stage import settings

    c = RunConfig(n_boot=7, seed=3, per_band=1, judge_per_class=4, split="paper", keep_distributions=True)
    made = settings(c)
    assert made == ScoreSettings(**{f: getattr(c, f) for f in ScoreSettings.__dataclass_fields__})
    assert c.section("scoring")["n_boot"] == 7 and "n_boot" not in c.section("collection")
    spec = backend_spec(RunConfig(simulator_backend="openai", simulator_model="m", simulation_mode="echo",
                                  simulator_base_url="http://x/v1", max_in_flight=3), "simulator")  # fmt: skip
    assert (spec.kind, spec.model, spec.base_url, spec.simulation_mode, spec.max_in_flight) == (
        "openai", "m", "http://x/v1", "echo", 3,
    )  # fmt: skip
    assert backend_spec(RunConfig(simulation_mode="echo"), "explainer").simulation_mode == "auto"


def test_run_id_hashes_the_effective_parameters():
    same = default_run_id(effective_parameters({}))
    assert default_run_id(effective_parameters({"n_excerpts": 4000, "seed": 0})) == same  # defaults stated
    assert default_run_id(effective_parameters({"seed": 1})) != same
    how = {"executor": "ray", "shards": 4, "max_in_flight": 8, "requests_per_minute": 500.0}
    assert default_run_id(effective_parameters(how)) == same  # how the run is carried out: the same run
    # how it is shown or accounted: the viewer's first unit, prices, the exit-code policy, the key's variable
    shown = {"layer": 15, "neuron": 955, "prices": {"prompt": 0.15, "completion": 0.6}, "fail_on_errors": True}
    shown |= {"explainer_api_key_env": "MY_KEY", "simulator_api_key_env": "MY_KEY"}
    for name, value in shown.items():
        assert default_run_id(effective_parameters({name: value})) == same, name
    for name, value in {"top_k": 5, "explainer_model": "x", "n_boot": 10, "temperature": 0.5}.items():
        assert default_run_id(effective_parameters({name: value})) != same, name  # these change results
    quick = effective_parameters(preset="quick")
    assert quick["n_excerpts"] == params.PRESETS["quick"]["n_excerpts"]
    assert effective_parameters({"n_excerpts": 99}, preset="quick")["n_excerpts"] == 99  # -p wins
    with pytest.raises(UserError, match="Unknown preset 'quik'. Did you mean 'quick'?"):
        effective_parameters(preset="quik")


def test_notebooks_declare_exactly_the_schema_parameters_with_its_types():
    hints = config.hints()
    for stage in STAGES:
        declared = declared_parameters(notebooks_dir() / stage.notebook)
        mine = {n for n in declared if n not in params.OWNED}
        assert mine == set(config.stage_parameters(stage.folder)), stage.notebook
        for name in mine:
            assert conforms(declared[name], hints[name]), f"{stage.notebook}: {name} = {declared[name]!r}"
            if config.schema()[name].metadata.get("when_set"):  # passed to the notebook only when set
                assert declared[name] == config.defaults()[name], f"{stage.notebook}: {name} != the schema's default"


def _fix_strings() -> list[tuple[str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UserError" and len(node.args) > 1:
                found.append((path.name, ast.get_source_segment(source, node.args[1]) or ""))
    return found


def test_every_parameter_an_error_message_suggests_exists():
    """A fix that says `name=...` names a parameter the command line (or a notebook) accepts (a dotted
    ``role.name.setting=`` is an extension's setting, checked against its own dataclass)."""
    fixes = _fix_strings()
    assert len(fixes) > 40
    accepted = set(config.schema()) | set(params.OWNED)
    for where, text in fixes:
        for name in re.findall(r"(?<![.\w])([a-z][a-z_0-9]*)=", text):
            assert name in accepted, f"{where}: the fix {text[:80]} suggests {name}=, which no stage accepts"


def test_every_command_the_package_names_exists():
    """A message or docstring that says `nbutils X` or `python -m nbutils X` names a real subcommand."""
    from nbutils.run.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if a.choices and "run" in a.choices]
    named = []
    for path in sorted((Path(config.__file__).parent.parent).rglob("*.py")):
        for command in re.findall(r"(?:python -m nbutils|`nbutils) ([a-z][a-z_-]*)", path.read_text()):
            named.append((path.name, command))
    assert len(named) > 15
    assert [(where, c) for where, c in named if c not in sub.choices] == []


def test_papermill_reads_every_declared_parameter():
    """papermill's own reader of the parameters cell (a line it cannot parse is an "unknown parameter" it only
    warns about) finds every parameter the chain passes."""
    import papermill

    for stage in STAGES:
        path = notebooks_dir() / stage.notebook
        assert set(papermill.inspect_notebook(str(path))) == set(declared_parameters(path)), stage.notebook


def test_an_interrupt_says_how_to_continue_and_names_the_run_id_only_when_one_was_given(monkeypatch, capsys):
    from nbutils.run import cli, pipeline

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", ctrl_c)  # Ctrl-C while the chain runs
    assert cli.main(["run"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; rerun the same command to continue"
    assert cli.main(["run", "--run-id", "mine"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; rerun the same command (with the same --run-id) to continue"
