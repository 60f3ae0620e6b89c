"""The ``attnplug`` command: output shapes, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnplug import cli
from attnplug.backends import registry, reload_backends

ROOT = Path(__file__).resolve().parents[1]

DENSE = """
[model]
num_layers = 4
hidden_size = 64
num_attention_heads = 4
num_query_groups = 2
ffn_hidden_size = 128
pipeline_model_parallel_size = 2
"""


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    for name in (registry.STRICT_ENV, registry.DISABLE_ENV):
        monkeypatch.delenv(name, raising=False)
    reload_backends()
    yield
    reload_backends()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2
    assert err.startswith("attnplug: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


def test_a_typo_in_the_config_exits_2_with_one_line_and_a_suggestion(tmp_path):
    path = write_config(tmp_path, DENSE.replace("num_layers", "num_layer"))
    result = subprocess.run(
        [sys.executable, "-m", "attnplug", "plan", str(path)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, check=False,
    )
    assert_one_line_error(result.returncode, result.stderr, "unknown field 'num_layer'",
                          "did you mean 'num_layers'?")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_bad_value_names_the_field(tmp_path, capsys):
    path = write_config(tmp_path, DENSE.replace("hidden_size = 64", "hidden_size = -1"))
    status, _, err = run_main(capsys, "plan", str(path))
    assert_one_line_error(status, err, "hidden_size=-1")


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    status, _, err = run_main(capsys, "plan", str(tmp_path / "nowhere.toml"))
    assert_one_line_error(status, err, "nowhere.toml", "does not exist")


def test_a_backend_that_is_not_installed_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    entry_points = registry._entry_points
    monkeypatch.setattr(registry, "_entry_points",
                        lambda: [ep for ep in entry_points() if ep.name != "te"])
    path = write_config(tmp_path, DENSE + 'backend = "te"\n')
    status, _, err = run_main(capsys, "plan", str(path))
    assert_one_line_error(status, err, 'pip install "attnplug[te]"')


def test_backends_json_has_exactly_the_public_keys(capsys):
    status, out, _ = run_main(capsys, "backends", "--json")
    assert status == 0
    rows = json.loads(out)
    assert {tuple(row) for row in rows} == {
        ("name", "distribution", "version", "priority", "available", "reasons", "error")}
    assert "local" in [row["name"] for row in rows]


def test_backends_table_lists_local(capsys):
    status, out, _ = run_main(capsys, "backends")
    assert status == 0 and "local" in out and "attnplug" in out


def test_plan_json_is_describe_plan_for_every_stage(tmp_path, capsys):
    path = write_config(tmp_path, DENSE)
    status, out, err = run_main(capsys, "plan", str(path), "--json")
    assert status == 0, err
    plan = json.loads(out)
    assert plan["backend"] == "local"
    assert [(layer["index"], layer["pp_rank"]) for layer in plan["layers"]] == [
        (0, 0), (1, 0), (2, 1), (3, 1)]
    layer = plan["layers"][0]
    assert {"index", "attention", "mlp", "pp_rank", "vp_stage", "slots"} <= set(layer)
    assert all(set(served) == {"class", "backend"} for served in layer["slots"].values())


def test_plan_backend_overrides_the_config_and_names_a_bad_one(tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path, DENSE.replace("[model]", '[model]\nbackend = "nope"'))
    status, _, err = run_main(capsys, "plan", str(path))
    assert_one_line_error(status, err, "unknown backend 'nope'", "'local'")
    status, out, err = run_main(capsys, "plan", str(path), "--backend", "local", "--json")
    assert status == 0, err
    plan = json.loads(out)
    assert plan["backend"] == "local"
    assert {served["backend"] for layer in plan["layers"]
            for served in layer["slots"].values()} == {"attnplug", "local"}  # core + kernels
    status, _, err = run_main(capsys, "plan", str(write_config(tmp_path, DENSE)), "--backend",
                              "loca")
    assert_one_line_error(status, err, "unknown backend 'loca'")


def test_plan_with_a_pp_rank_shows_only_that_stage(tmp_path, capsys):
    path = write_config(tmp_path, DENSE)
    status, out, _ = run_main(capsys, "plan", str(path), "--pp-rank", "1", "--json")
    assert status == 0
    assert [layer["index"] for layer in json.loads(out)["layers"]] == [2, 3]


def test_plan_out_of_range_pp_rank_is_one_line(tmp_path, capsys):
    path = write_config(tmp_path, DENSE)
    status, _, err = run_main(capsys, "plan", str(path), "--pp-rank", "7")
    assert_one_line_error(status, err, "pp_rank=7")


def test_plan_table_has_a_column_per_slot_group_with_class_and_backend(tmp_path, capsys,
                                                                        monkeypatch):
    plan = {"backend": "local", "final_layernorm": None, "layers": [
        {"index": i, "attention": "gdn", "mlp": "dense", "pp_rank": i // 2, "vp_stage": i % 2,
         "slots": {"self_attention": {"class": "GatedDeltaNet", "backend": "attnplug"},
                   "self_attention.in_proj": {"class": "FastLinear", "backend": "thirdparty"},
                   "input_layernorm": {"class": "RMSNorm", "backend": "local"}}}
        for i in range(4)]}
    monkeypatch.setattr("attnplug.plan.describe_plan", lambda config, pp_rank, vp_stage: plan)
    status, out, _ = run_main(capsys, "plan", str(write_config(tmp_path, DENSE)))
    assert status == 0
    header = next(line for line in out.splitlines() if "index" in line)
    for column in ("stage", "attention", "mlp", "self_attention", "input_layernorm"):
        assert column in header
    assert "in_proj: FastLinear (thirdparty)" in out and "RMSNorm (local)" in out
    assert "pp1/vp1" in out


def test_train_without_its_module_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "attnplug.train", None)  # import attnplug.train fails
    status, _, err = run_main(capsys, "train", str(write_config(tmp_path, DENSE)))
    assert_one_line_error(status, err, "the train command is not available")


def test_help_exits_0_and_a_missing_command_exits_2(capsys):
    assert cli.main(["--help"]) == 0
    assert "backends" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert "attnplug: error:" in capsys.readouterr().err
