"""``attnplug train``: the [train] table, the loop, checkpoints, the JSON result, and learning."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from attnplug._errors import ConfigError
from attnplug.train import TrainConfig, add_train_arguments, lr_factor, run_train

HAS_MODEL = importlib.util.find_spec("attnplug.layers.model") is not None
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="attnplug.layers.model is not there yet")

# A tiny Qwen3-Next-like hybrid: Gated DeltaNet then softmax attention, MoE MLPs.
TINY_MODEL = {
    "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
    "experimental_attention_variant": "gdn", "linear_attention_freq": 2,
    "linear_num_key_heads": 1, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "ffn_hidden_size": 64, "num_moe_experts": 2,
    "moe_router_topk": 1, "moe_ffn_hidden_size": 32,
}
TINY_TRAIN = {
    "task": "mqar", "steps": 10, "batch_size": 8, "seq_len": 16, "vocab_size": 17,
    "num_kv_pairs": 3, "device": "cpu", "warmup_steps": 2, "eval_every": 5, "eval_batches": 2,
    "log_every": 5,
}


def _toml(tables: dict[str, dict]) -> str:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def _config(tmp_path: Path, model: dict | None = None, train: dict | None = None,
            name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(_toml({"model": TINY_MODEL | (model or {}),
                           "train": TINY_TRAIN | (train or {})}))
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="attnplug train")
    add_train_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _train_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert run_train(_args(*argv, "--json")) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints one line and nothing else on stdout"
    return json.loads(out)


# -- the [train] table ----------------------------------------------------------------------


def test_defaults_are_a_valid_small_cpu_run():
    cfg = TrainConfig()
    assert (cfg.task, cfg.device, cfg.decay_steps) == ("mqar", "auto", cfg.steps)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(("field", "value", "accepted"), [
    ("task", "translation", "one of 'mqar', 'lm'"),
    ("steps", 0, "an integer >= 1"),
    ("steps", 2.5, "an integer >= 1"),
    ("batch_size", -4, "an integer >= 1"),
    ("seq_len", 1, "an integer >= 2"),
    ("lr", 0.0, "> 0.0"),
    ("lr", float("nan"), "a number"),
    ("lr", "fast", "a number"),
    ("min_lr_ratio", 1.5, "a fraction of lr in [0, 1]"),
    ("warmup_steps", -1, "an integer >= 0"),
    ("lr_decay_steps", 0, "an integer >= 1 or None"),
    ("weight_decay", -0.1, ">= 0.0"),
    ("grad_clip", float("inf"), "a finite number"),
    ("seed", -1, "an integer >= 0"),
    ("seed", True, "an integer >= 0"),
    ("device", "tpu", "one of 'auto', 'cpu', 'cuda'"),
    ("eval_every", -5, "an integer >= 0"),
    ("eval_batches", 0, "an integer >= 1"),
    ("log_every", 0, "an integer >= 1"),
    ("vocab_size", 0, "an integer >= 1"),
    ("num_kv_pairs", 0, "an integer >= 1"),
    ("lm_corpus_tokens", 0, "an integer >= 1"),
])
def test_each_bad_value_names_its_field_the_value_and_what_is_accepted(field, value, accepted):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(f"[train] {field}={value!r}")
    assert accepted in message


@pytest.mark.parametrize(("values", "fragment"), [
    ({"warmup_steps": 50, "lr_decay_steps": 20}, "[train] warmup_steps=50"),
    ({"task": "mqar", "vocab_size": 9, "num_kv_pairs": 8}, "[train] vocab_size=9"),
    ({"task": "mqar", "seq_len": 20, "num_kv_pairs": 8}, "[train] seq_len=20"),
    ({"task": "lm", "vocab_size": 20}, "[train] vocab_size=20"),
    ({"task": "lm", "seq_len": 512, "lm_corpus_tokens": 3000}, "[train] lm_corpus_tokens=3000"),
])
def test_settings_that_do_not_fit_together_are_refused(values, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        TrainConfig(**values)


def test_unknown_key_suggests_the_closest_field():
    with pytest.raises(ConfigError, match=r"unknown field 'stpes'; did you mean 'steps'\?"):
        TrainConfig.from_dict({"stpes": 3})


def test_toml_without_a_train_table_gives_the_defaults(tmp_path):
    path = tmp_path / "model_only.toml"
    path.write_text(_toml({"model": TINY_MODEL}))
    assert TrainConfig.from_toml(path) == TrainConfig()


def test_toml_train_table_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(_toml({"model": TINY_MODEL, "train": {"learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match=r"bad.toml \[train\]: unknown field 'learning_rate'"):
        TrainConfig.from_toml(path)


def test_warmup_then_cosine_to_the_floor():
    factors = [lr_factor(s, warmup_steps=4, decay_steps=14, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert factors[14:] == [pytest.approx(0.1)] * 6


# -- command-line options that are refused before any training --------------------------------


def test_save_every_needs_save(tmp_path):
    with pytest.raises(ConfigError, match="--save-every=2 .* together with --save PATH"):
        run_train(_args(_config(tmp_path), "--save-every", "2"))


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    message = r'--plot needs matplotlib.*pip install "attnplug\[plot\]"'
    with pytest.raises(ConfigError, match=message):
        run_train(_args(_config(tmp_path), "--plot", tmp_path / "loss.png"))


def test_overrides_are_validated_like_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"\[train\] steps=0"):
        run_train(_args(_config(tmp_path), "--steps", "0"))


def test_resume_from_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--resume .*does not exist"):
        run_train(_args(_config(tmp_path), "--resume", tmp_path / "nope.pt"))


# -- the loop, with a stand-in model ---------------------------------------------------------


class _StandIn(nn.Module):
    """The GPTModel interface with a bigram model and an auxiliary loss on an unused weight."""

    backend_name = "stand-in"

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, vocab_size)
        self.unused = nn.Parameter(torch.full((4,), 3.0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def auxiliary_loss(self) -> torch.Tensor:
        return (self.unused**2).sum()


@pytest.fixture
def stand_in(monkeypatch):
    built = []

    def build(model_cfg, vocab_size, seq_len):
        built.append(_StandIn(vocab_size))
        return built[-1]

    monkeypatch.setattr("attnplug.train.build_model", build)
    return built


def test_the_auxiliary_loss_is_trained_but_reported_apart(tmp_path, capsys, stand_in):
    result = _train_json(capsys, _config(tmp_path, train={"steps": 30, "weight_decay": 0.0}))
    assert float(stand_in[0].unused.detach().abs().max()) < 3.0 - 0.05
    assert result["aux_loss"] > 0
    assert result["losses"][0] == result["initial_loss"] < 10  # cross-entropy only, no aux


def test_a_diverging_run_stops_with_a_clear_error(tmp_path, stand_in, monkeypatch):
    monkeypatch.setattr(_StandIn, "auxiliary_loss", lambda self: torch.tensor(float("nan")))
    with pytest.raises(ConfigError, match=r"training diverged at step 1 .*lower \[train\] lr"):
        run_train(_args(_config(tmp_path)))


def test_without_json_progress_goes_to_stderr_and_a_table_to_stdout(tmp_path, capsys, stand_in):
    assert run_train(_args(_config(tmp_path))) == 0
    out, err = capsys.readouterr()
    assert "step 5/10" in err and "eval loss" in err
    assert "attnplug train" in out and "stand-in" in out and "tokens/s" in out


# -- the real model ----------------------------------------------------------------------------


def test_steady_rate_is_taken_over_the_second_half_of_the_steps():
    from attnplug.report import steady_tokens_per_second

    # a slow first step (compilation) does not count; an odd count keeps the longer half
    assert steady_tokens_per_second([(100, 10.0), (100, 1.0), (100, 1.0), (100, 2.0)]) == 200 / 3
    assert steady_tokens_per_second([(100, 10.0), (100, 1.0), (300, 1.0)]) == 200.0
    assert steady_tokens_per_second([(50, 0.5)]) == 100.0
    assert steady_tokens_per_second([]) == 0.0


@needs_model
def test_json_result_has_the_documented_keys(tmp_path, capsys):
    result = _train_json(capsys, _config(tmp_path), "--steps", "6")
    for key in ("backend", "steps", "initial_loss", "final_loss", "tokens_per_second",
                "accuracy", "task", "seed", "losses"):
        assert key in result
    assert result["backend"] == "local" and result["steps"] == 6 and result["task"] == "mqar"
    assert len(result["losses"]) == 6 and result["losses"][-1] == result["final_loss"]
    assert result["tokens_per_second"] > 0 and 0 <= result["accuracy"] <= 1
    assert result["tokens_per_second_steady"] > 0
    assert [e["step"] for e in result["evals"]] == [5, 6]
    assert result["chance_accuracy"] == pytest.approx(1 / 8)
    assert result["initial_loss"] == pytest.approx(math.log(17), rel=0.1)


@needs_model
def test_same_seed_same_losses_other_seed_other_losses(tmp_path, capsys):
    config = _config(tmp_path)
    first = _train_json(capsys, config, "--steps", "4")
    again = _train_json(capsys, config, "--steps", "4")
    other = _train_json(capsys, config, "--steps", "4", "--seed", "1")
    assert first["losses"] == again["losses"]
    assert first["losses"] != other["losses"] and other["seed"] == 1


@needs_model
def test_resume_continues_bit_for_bit(tmp_path, capsys):
    config = _config(tmp_path, train={"lr_decay_steps": 10})
    straight = _train_json(capsys, config, "--steps", "10")
    ckpt = tmp_path / "ckpt" / "half.pt"
    half = _train_json(capsys, config, "--steps", "5", "--save", ckpt)
    resumed = _train_json(capsys, config, "--steps", "10", "--resume", ckpt)
    assert half["losses"] == straight["losses"][:5]
    assert resumed["losses"] == straight["losses"]
    assert resumed["evals"] == straight["evals"] and resumed["steps"] == 10


@needs_model
def test_save_every_writes_a_checkpoint_that_resumes_the_same_run(tmp_path, capsys):
    config = _config(tmp_path, train={"steps": 8})
    ckpt = tmp_path / "every.pt"
    straight = _train_json(capsys, config, "--steps", "6", "--save", ckpt, "--save-every", "3")
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 6 and len(state["losses"]) == 6
    assert state["train_config"]["steps"] == 6 and state["model_config"]["num_layers"] == 2
    extended = _train_json(capsys, config, "--steps", "8", "--resume", ckpt)
    assert extended["losses"][:6] == straight["losses"] and len(extended["losses"]) == 8


@needs_model
def test_resume_refuses_a_changed_setting_and_a_finished_run(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    _train_json(capsys, _config(tmp_path), "--steps", "3", "--save", ckpt)
    changed = _config(tmp_path, train={"lr": 0.01}, name="changed.toml")
    with pytest.raises(ConfigError, match=r"\[train\] lr=0.003 but the config has 0.01"):
        run_train(_args(changed, "--steps", "6", "--resume", ckpt))
    wider = _config(tmp_path, model={"hidden_size": 64}, name="wider.toml")
    with pytest.raises(ConfigError, match=r"\[model\] hidden_size=32 but the config has 64"):
        run_train(_args(wider, "--steps", "6", "--resume", ckpt))
    with pytest.raises(ConfigError, match="at step 3 and \\[train\\] steps=3"):
        run_train(_args(_config(tmp_path), "--steps", "3", "--resume", ckpt))


@needs_model
def test_backend_override_reaches_the_model(tmp_path, capsys):
    result = _train_json(capsys, _config(tmp_path, model={"backend": "auto"}), "--steps", "2",
                         "--backend", "local")
    assert result["backend"] == "local"


@needs_model
def test_lm_task_trains_and_reports(tmp_path, capsys):
    config = _config(tmp_path, train={"task": "lm", "vocab_size": 40, "seq_len": 32,
                                      "lm_corpus_tokens": 4000})
    result = _train_json(capsys, config, "--steps", "4")
    assert result["task"] == "lm" and result["chance_accuracy"] is None
    assert result["initial_loss"] == pytest.approx(math.log(40), rel=0.1)


@needs_model
@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason='matplotlib is not installed (pip install "attnplug[plot]")')
def test_plot_writes_a_png(tmp_path, capsys):
    png = tmp_path / "plots" / "loss.png"
    _train_json(capsys, _config(tmp_path), "--steps", "3", "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- learning ------------------------------------------------------------------------------------


@needs_model
def test_a_tiny_hybrid_learns_associative_recall_well_above_chance(tmp_path, capsys):
    """GDN + softmax attention on MQAR: query accuracy far above both a uniform guess (1/16) and
    the best guess among the values seen in the context (about 1/3 with 4 pairs)."""
    model = {"hidden_size": 64, "num_attention_heads": 2, "linear_num_key_heads": 2,
             "linear_num_value_heads": 2, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
             "ffn_hidden_size": 128, "num_moe_experts": None}
    model = {k: v for k, v in (TINY_MODEL | model).items() if v is not None}
    path = tmp_path / "mqar.toml"
    path.write_text(_toml({"model": model, "train": TINY_TRAIN | {
        "steps": 300, "batch_size": 32, "seq_len": 24, "vocab_size": 33, "num_kv_pairs": 4,
        "lr": 3e-3, "warmup_steps": 20, "eval_every": 0, "eval_batches": 4}}))
    result = _train_json(capsys, path)
    assert result["accuracy"] > 0.6, result["evals"]
    assert result["final_loss"] < result["initial_loss"] / 3
