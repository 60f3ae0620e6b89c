"""The state-walk probe (benchmarks/probe_gdn_walks.py) launches the walks the way the served
call does, so that what it reports on a GPU is the launch's doing and not its plumbing.

Under Triton's CPU interpreter (float32, small shapes): each walk as the probe runs it gives the
output and final state (forward walk) and the initial state's gradient and dv (dh walk) of the
gated delta rule — against float64 through autograd of the reference op — and a candidate's
check against the autotuner's first configuration finds nothing. (Skipped with the folder's
reason where Triton is missing: conftest.py's autouse fixture.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_cases import assert_matches

PROBE = Path(__file__).resolve().parents[3] / "benchmarks" / "probe_gdn_walks.py"
sys.path.insert(0, str(PROBE.parent))
import probe_gdn_walks as probe  # noqa: E402

from attnplug.ops import naive_recurrent_gated_delta_rule  # noqa: E402

B, T, H, DIM = 1, 100, 2, 16


def _reference(x: dict) -> dict:
    """o, final state and the gradients of ``Σ o·do + Σ final·dht`` for h0 and v, float64."""
    leaves = {n: x[n].detach().double().view(B, T, *x[n].shape[1:]).requires_grad_()
              for n in ("q", "k", "v")}
    h0 = x["h0"].detach().double().requires_grad_()
    o, final = naive_recurrent_gated_delta_rule(
        leaves["q"], leaves["k"], leaves["v"], x["g"].double().view(B, T, H),
        x["beta"].double().view(B, T, H), scale=x["scale"], initial_state=h0,
        output_final_state=True, use_qk_l2norm=True)
    ((o * x["do"].double().view(B, T, H, DIM)).sum() + (final * x["dht"].double()).sum()).backward()
    return {"o": o.view(B * T, H, DIM), "final": final, "dh0": h0.grad,
            "dv": leaves["v"].grad.view(B * T, H, DIM)}


@pytest.mark.parametrize("lean", [False, True], ids=["served", "lean"])
def test_the_walks_as_the_probe_runs_them_give_the_rule(lean: bool) -> None:
    x = probe.walk_inputs(B, T, H, DIM, seed=1, device="cpu", dtype=torch.float32)
    ref = _reference(x)
    fwd = probe.run_walk("fwd", x, lean)
    dh = probe.run_walk("dh", x)
    for name, got in (("o", fwd["o"]), ("final", fwd["final"]), ("dh0", dh["dh0"]),
                      ("dv", dh["dv"])):
        assert_matches(f"{'lean' if lean else 'served'} {name}", got, ref[name], torch.float32)


@pytest.mark.parametrize("candidate", [probe.Candidate("fwd", 64, 4, 2, lean=True),
                                       probe.Candidate("fwd", 128, 8, 1),
                                       probe.Candidate("dh", 32, 4, 1)],
                         ids=lambda c: c.label)
def test_a_candidates_check_compares_it_with_the_first_configuration(candidate) -> None:
    result = probe.check_one(candidate, B, T, H, DIM, device="cpu", dtype=torch.float32)
    expected = {"o", "final"} if candidate.walk == "fwd" else {"dstates", "dh0", "y", "dv"}
    assert set(result["errors"]) == expected
    assert all(e <= 1e-5 for e in result["errors"].values()), result


def test_the_candidates_cover_the_autotuner_and_the_untried_launches() -> None:
    from attnplug_triton.ops.gated_delta_rule.chunk_h import CONFIGS

    every = probe.candidates(["fwd", "dh"], every=True)
    todo = probe.candidates(["fwd", "dh"])
    labels = [c.label for c in every]
    assert len(labels) == len(set(labels))
    for config in CONFIGS:
        for walk in ("fwd", "dh"):
            c = probe.Candidate(walk, config.kwargs["BV"], config.num_warps, config.num_stages)
            assert c in every
            assert (c in todo) == (config.num_stages <= 2)
    assert probe.Candidate("fwd", 64, 4, 2, lean=True) in todo
    assert probe.Candidate("dh", 128, 8, 2) in todo
    assert not any(c.lean for c in todo if c.walk == "dh")  # the dh walk has no lean ordering
    assert probe.constexprs(probe.Candidate("fwd", 64, 4, 2, lean=True), 128)["LEAN"] is True


def test_a_candidate_is_checked_in_a_process_of_its_own() -> None:
    """The protocol the probe's parent reads: one ``RESULT {json}`` line from ``--one``."""
    c = probe.Candidate("fwd", 32, 4, 2, lean=True)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(PROBE), "--one", json.dumps(c._asdict()),
                           "--device", "cpu", "--batch", "1", "--seqlen", "70", "--heads", "2",
                           "--head-dim", "16"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    errors = json.loads(line[7:])["errors"]
    assert set(errors) == {"o", "final"} and all(e <= 1e-5 for e in errors.values()), errors
