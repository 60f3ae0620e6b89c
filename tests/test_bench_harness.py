"""benchmarks/harness.py on the CPU, with a fake timer: rounds, rotation, pooling, failures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import Bench, finish_checks, quantile  # noqa: E402


class DriftingTimer:
    """Each call returns ``reps`` times of ``base[name]`` scaled by a clock that slows down by
    ``drift`` per call (the GPU warming up), and records the order of the calls."""

    def __init__(self, base: dict[str, float], drift: float = 0.0, reps: int = 4) -> None:
        self.base, self.drift, self.reps = base, drift, reps
        self.calls: list[tuple[str, float]] = []

    def __call__(self, fn, warmup, rep, grad_to_none):
        name = fn()
        self.calls.append((name, rep))
        slow = 1.0 + self.drift * (len(self.calls) - 1)
        return [self.base[name] * slow * (1 + 0.001 * i) for i in range(self.reps)]


def _impls(names):
    return {name: (lambda name=name: name) for name in names}


def test_rounds_go_back_and_forth_and_share_the_repetition_time() -> None:
    timer = DriftingTimer({"a": 1.0, "b": 2.0, "c": 3.0})
    bench = Bench("t", anchor="a", rep=90.0, rounds=3, timer=timer)
    bench.measure("case", _impls(["b", "a", "c"]))  # the anchor goes first
    assert [name for name, _ in timer.calls] == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {rep for _, rep in timer.calls} == {30.0}


@pytest.mark.parametrize("rounds", [2, 4])
def test_back_and_forth_cancels_a_drift_that_one_pass_charges_to_the_last_rows(rounds) -> None:
    """Four equal implementations on a clock that slows 5% a call: one pass in order makes
    the last row look 15% slower than the first; an even number of rounds, none."""
    base = dict.fromkeys(["a", "b", "c", "d"], 1.0)
    once = Bench("t", anchor="a", rounds=1, timer=DriftingTimer(base, drift=0.05))
    rows = once.measure("case", _impls(base))
    assert rows[-1].ratio == pytest.approx(1.15, rel=1e-2)
    both_ways = Bench("t", anchor="a", rounds=rounds, timer=DriftingTimer(base, drift=0.05))
    rows = both_ways.measure("case", _impls(base))
    assert all(row.ratio == pytest.approx(1.0, rel=1e-9) for row in rows), rows


def test_pooled_statistics_ratios_and_tflops() -> None:
    timer = DriftingTimer({"a": 2.0, "b": 1.0}, reps=5)
    rows = Bench("t", anchor="a", rounds=2, timer=timer).measure("case", _impls(["a", "b"]),
                                                              flops=2e9)
    a, b = rows
    pooled = [2.0 * (1 + 0.001 * i) for i in range(5)] * 2
    assert a.median_ms == pytest.approx(2.0 * 1.002)  # each round's median, averaged
    assert (a.p20_ms, a.p80_ms) == (pytest.approx(quantile(pooled, 0.2)),
                                    pytest.approx(quantile(pooled, 0.8)))
    assert b.ratio == pytest.approx(b.median_ms / a.median_ms)
    assert b.tflops == pytest.approx(2e9 / (b.median_ms * 1e-3) / 1e12)


def test_skipped_and_failing_implementations_leave_the_rest_measured(tmp_path, capsys) -> None:
    calls = []

    def broken():
        calls.append("broken")
        raise RuntimeError("out of shared memory\nsecond line")

    timer = DriftingTimer({"a": 1.0, "b": 1.5})
    impls = {"a": lambda: "a", "gone": "needs a GPU", "broken": broken, "b": lambda: "b"}
    bench = Bench("t", anchor="a", rounds=3, out=tmp_path, timer=timer)
    rows = {row.impl: row for row in bench.measure("case", impls)}
    assert rows["gone"].status == "skipped: needs a GPU" and rows["gone"].median_ms is None
    assert rows["broken"].status == "error: RuntimeError: out of shared memory"
    assert calls == ["broken"]  # not timed again after it raised
    assert rows["b"].ratio == pytest.approx(1.5, rel=1e-2)
    assert "round 3/3: " in capsys.readouterr().err
    bench.report()
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["rounds"] == 3 and len(saved["results"]) == 4
    assert "over 3 round(s)" in capsys.readouterr().out


def test_the_anchor_must_be_measured_and_rounds_be_positive() -> None:
    with pytest.raises(ValueError, match="anchor 'x' is not among"):
        Bench("t", anchor="x", timer=DriftingTimer({})).measure("case", _impls(["a"]))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"rounds={bad!r} is not accepted"):
            Bench("t", anchor="a", rounds=bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40), st.floats(0.0, 1.0))
def test_quantile_is_torchs_linear_quantile(values: list[float], q: float) -> None:
    want = torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()
    assert quantile(values, q) == pytest.approx(want, rel=1e-9, abs=1e-6)


def test_finish_checks_names_failures_spares_pruned_ones_and_writes_its_json(
        tmp_path, capsys, monkeypatch) -> None:
    """A failed row fails the run and is named; a failed row of a pruned configuration is
    named as known and does not; the JSON lands at ``<out>/<name>.json`` (session 12's version
    wrote it under a function's repr)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a card")
    good = {"part": "shapes", "dtype": "bf16", "case": "fine", "ok": True}
    pruned = {"part": "probe", "dtype": "bf16", "case": "D32 forced", "ok": False,
              "pruned": "pruned at K=32"}
    bad = {"part": "probe", "dtype": "bf16", "case": "D64 forced", "ok": False}
    assert finish_checks("gdn_check", [good, pruned], 0.0, tmp_path) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 checks passed" in printed and "known, pruned: probe bf16 D32 forced" in printed
    saved = json.loads((tmp_path / "gdn_check.json").read_text())
    assert saved["device"] == "a card" and len(saved["rows"]) == 2
    assert finish_checks("gdn_check", [good, pruned, bad], 0.0, None) == 1
    assert "FAILED: probe bf16 D64 forced" in capsys.readouterr().out
