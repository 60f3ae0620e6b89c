"""Every example config builds, plans and runs a forward pass; the pattern-string example is the
frequency example written another way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnplug import TransformerConfig
from attnplug.backends.local import LocalSpecProvider
from attnplug.config import read_toml
from attnplug.layers.model import GPTModel
from attnplug.patterns import from_hybrid_pattern, to_hybrid_pattern
from attnplug.plan import describe_plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VOCAB = 64


def build(path: Path) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(TransformerConfig.from_toml(path), VOCAB, backend=LocalSpecProvider())


def test_there_are_examples():
    names = {path.name for path in EXAMPLES.glob("*.toml")}
    assert {"qwen3_next_hybrid.toml", "qwen3_next_pattern.toml"} <= names


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_builds_plans_and_runs_a_forward(path):
    config = TransformerConfig.from_toml(path)
    plan = describe_plan(config, backend=LocalSpecProvider())
    assert [row["index"] for row in plan["layers"]] == list(range(config.num_layers))
    model = build(path)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 12, VOCAB) and torch.isfinite(logits).all()


def test_the_pattern_example_is_the_hybrid_example():
    hybrid, pattern = EXAMPLES / "qwen3_next_hybrid.toml", EXAMPLES / "qwen3_next_pattern.toml"
    hybrid_config = TransformerConfig.from_toml(hybrid)
    pattern_config = TransformerConfig.from_toml(pattern)
    assert from_hybrid_pattern(to_hybrid_pattern(hybrid_config)) == from_hybrid_pattern(
        pattern_config.hybrid_layer_pattern)
    assert read_toml(hybrid)["train"] == read_toml(pattern)["train"]
    hybrid_model, pattern_model = build(hybrid), build(pattern)
    assert sum(p.numel() for p in hybrid_model.parameters()) == sum(
        p.numel() for p in pattern_model.parameters())
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(hybrid_model(ids), pattern_model(ids))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_trains_through_the_command(path, capsys):
    import json

    from attnplug.cli import main

    assert main(["train", str(path), "--steps", "4", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 4 and result["backend"] == "local"
    assert len(result["losses"]) == 4
    assert all(loss == loss and loss < 1e3 for loss in result["losses"])  # finite, not NaN
