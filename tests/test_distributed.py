"""Training on several processes: the [parallel] table, pipeline chunks built from the slices,
auxiliary losses across stages, and 2-process gloo runs (PP=2, PP=2×VPP=2, FSDP2 DP=2, DCP
checkpoints across process counts) that match one process step for step."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnplug._errors import ConfigError
from attnplug.config import TransformerConfig
from attnplug.distributed.config import ParallelConfig, resolve_layout, world_size_from_env
from attnplug.distributed.microbatch import accumulate_gradients
from attnplug.distributed.stage import PipelineStageModule, build_stage_modules
from attnplug.layers.model import GPTModel
from attnplug.train import add_train_arguments, run_train

VOCAB, SEQ = 17, 16

# A tiny Qwen3-Next-like hybrid (Gated DeltaNet + softmax attention, MoE MLPs: an auxiliary loss
# in every layer), four layers so that PP=2 × VPP=2 gives every chunk one layer.
TINY_MODEL = {
    "num_layers": 4, "hidden_size": 32, "num_attention_heads": 2,
    "experimental_attention_variant": "gdn", "linear_attention_freq": 2,
    "linear_num_key_heads": 1, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "ffn_hidden_size": 64, "num_moe_experts": 2,
    "moe_router_topk": 1, "moe_ffn_hidden_size": 32,
}
DSA_MODEL = {
    "num_layers": 4, "hidden_size": 32, "num_attention_heads": 2,
    "experimental_attention_variant": "dsa", "dsa_indexer_n_heads": 2,
    "dsa_indexer_head_dim": 16, "dsa_indexer_topk": 4, "dsa_indexer_loss_coeff": 0.1,
    "num_moe_experts": 2, "moe_layer_freq": "[0,1]*2", "moe_ffn_hidden_size": 32,
}
TINY_TRAIN = {
    "task": "mqar", "steps": 4, "batch_size": 8, "seq_len": SEQ, "vocab_size": VOCAB,
    "num_kv_pairs": 3, "device": "cpu", "warmup_steps": 2, "lr_decay_steps": 4, "eval_every": 2,
    "eval_batches": 2,
    "log_every": 1,
}
LOSS_TOL = {"rel": 1e-5, "abs": 1e-6}  # float32, summed in another order


def _config(**overrides: object) -> TransformerConfig:
    return TransformerConfig(**(TINY_MODEL | overrides))


# -- the [parallel] table and the layout --------------------------------------------------------


def test_parallel_defaults_and_round_trip():
    cfg = ParallelConfig()
    assert (cfg.fsdp, cfg.schedule, cfg.microbatches) == (False, None, None)
    assert ParallelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(("field", "value", "accepted"), [
    ("fsdp", "yes", "true or false"),
    ("schedule", "zero_bubble", "one of 'gpipe', '1f1b', 'interleaved_1f1b'"),
    ("microbatches", 0, "an integer >= 1 or None"),
    ("microbatches", 2.0, "an integer"),
])
def test_each_bad_parallel_value_names_its_field(field, value, accepted):
    with pytest.raises(ConfigError) as info:
        ParallelConfig(**{field: value})
    assert str(info.value).startswith(f"[parallel] {field}={value!r}")
    assert accepted in str(info.value)


def test_parallel_table_from_toml_and_unknown_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nnum_layers = 2\n[parallel]\nfsdp = true\nmicrobatches = 4\n')
    assert ParallelConfig.from_toml(path) == ParallelConfig(fsdp=True, microbatches=4)
    path.write_text("[parallel]\nmicrobatch = 4\n")
    with pytest.raises(ConfigError, match="unknown field 'microbatch'; did you mean "
                                          "'microbatches'"):
        ParallelConfig.from_toml(path)


def test_layout_defaults_pick_the_schedule_and_the_microbatches():
    pp = _config(pipeline_model_parallel_size=2)
    layout = resolve_layout(ParallelConfig(), pp, 8, 2)
    assert (layout.pp, layout.dp, layout.schedule, layout.microbatches) == (2, 1, "1f1b", 2)
    vpp = _config(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    assert resolve_layout(ParallelConfig(), vpp, 8, 2).schedule == "interleaved_1f1b"
    fsdp = resolve_layout(ParallelConfig(fsdp=True), _config(), 8, 2)
    assert (fsdp.pp, fsdp.dp, fsdp.fsdp, fsdp.schedule, fsdp.local_microbatches) == (
        1, 2, True, None, 1)


def test_one_process_builds_the_whole_model_whatever_the_pipeline_fields_say():
    layout = resolve_layout(ParallelConfig(microbatches=4), _config(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2), 8, 1)
    assert (layout.pp, layout.vp, layout.dp, layout.schedule) == (1, None, 1, None)
    assert layout.microbatches == layout.local_microbatches == 4


@pytest.mark.parametrize(("parallel", "model", "world", "fragment"), [
    ({}, {"pipeline_model_parallel_size": 2}, 3,
     "3 processes is not accepted with [model] pipeline_model_parallel_size=2"),
    ({}, {}, 2, "[parallel] fsdp=False is not accepted with 2 processes"),
    ({"schedule": "interleaved_1f1b"}, {"pipeline_model_parallel_size": 2}, 2,
     "[parallel] schedule='interleaved_1f1b' is not accepted"),
    ({"schedule": "1f1b"}, {"pipeline_model_parallel_size": 2,
                            "virtual_pipeline_model_parallel_size": 2}, 2,
     "[parallel] schedule='1f1b' is not accepted with [model] virtual_pipeline"),
    ({"fsdp": True, "microbatches": 3}, {}, 2,
     "[parallel] microbatches=3 is not accepted with 2 data-parallel ranks"),
    ({"microbatches": 3}, {}, 1, "[parallel] microbatches=3 is not accepted with [train] "
                                 "batch_size=8"),
    ({"microbatches": 1}, {"pipeline_model_parallel_size": 2}, 2,
     "schedule '1f1b' needs at least pipeline_model_parallel_size=2 micro-batches"),
])
def test_layouts_that_do_not_work_are_refused_naming_the_field(parallel, model, world, fragment):
    with pytest.raises(ConfigError) as info:
        resolve_layout(ParallelConfig(**parallel), _config(**model), 8, world)
    assert fragment in str(info.value)


def test_gpipe_takes_any_number_of_microbatches():
    layout = resolve_layout(ParallelConfig(schedule="gpipe", microbatches=1),
                            _config(pipeline_model_parallel_size=2), 8, 2)
    assert layout.local_microbatches == 1


def test_world_size_comes_from_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size_from_env() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size_from_env() == 4
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        world_size_from_env()


def test_train_refuses_a_bad_process_count_before_starting_anything(tmp_path, monkeypatch):
    path = _write_run(tmp_path, "run.toml", model={"pipeline_model_parallel_size": 2})
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="3 processes is not accepted"):
        run_train(_args(path))


# -- pipeline chunks ----------------------------------------------------------------------------


def _all_chunks(config: TransformerConfig, seed: int = 0) -> list[PipelineStageModule]:
    """Every chunk of every rank, in pipeline order."""
    chunks = [chunk for rank in range(config.pipeline_model_parallel_size)
              for chunk in build_stage_modules(config, VOCAB, rank, seed=seed,
                                               max_sequence_length=SEQ)]
    return sorted(chunks, key=lambda c: c.stage_index)


PIPELINES = {
    "pp2": {"pipeline_model_parallel_size": 2},
    "pp2_vpp2": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
    "layout": {"pipeline_model_parallel_size": 2, "pipeline_model_parallel_layout": "Et|tttL"},
}


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_chunks_hold_their_slice_and_partition_the_whole_model(pipeline):
    config = _config(**PIPELINES[pipeline])
    torch.manual_seed(0)
    whole = GPTModel(config, VOCAB, max_sequence_length=SEQ)
    chunks = _all_chunks(config)
    assert [c.is_first for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    for chunk in chunks:
        assert (chunk.embedding is not None) == chunk.is_first
        assert (chunk.output_layer is not None) == chunk.is_last
        assert (chunk.decoder.final_layernorm is not None) == chunk.is_last
        numbers = [layer.layer_number for layer in chunk.decoder.layers.values()]
        assert numbers == [i + 1 for i in chunk.layer_ids]
    layer_ids = [i for chunk in chunks for i in chunk.layer_ids]
    assert layer_ids == list(range(config.num_layers))
    names = [name for chunk in chunks for name in chunk.state_dict()]
    assert sorted(names) == sorted(whole.state_dict()) and len(set(names)) == len(names)
    whole_state = whole.state_dict()
    for chunk in chunks:
        for name, value in chunk.state_dict().items():
            assert torch.equal(value, whole_state[name]), name


def test_a_chunk_built_alone_follows_its_spec_and_refuses_a_bad_rank():
    config = _config(pipeline_model_parallel_size=2)
    chunk = PipelineStageModule(config, VOCAB, 1)
    assert chunk.layer_ids == [2, 3] and chunk.is_last and chunk.embedding is None
    with pytest.raises(ConfigError, match="pp_rank=2"):
        PipelineStageModule(config, VOCAB, 2)
    with pytest.raises(ValueError, match="takes hidden states"):
        chunk(torch.zeros(2, 4, dtype=torch.long))


def _chained_backward(chunks: list[PipelineStageModule], ids: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
    """Run the chunks one after the other with a cut between each (as pipeline stages do: the
    next stage's input is a fresh leaf) and backpropagate stage by stage, last first."""
    x, cuts = ids, []
    for chunk in chunks[:-1]:
        y = chunk(x)
        x = y.detach().requires_grad_()
        cuts.append((y, x))
    logits = chunks[-1](x)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    for y, x in reversed(cuts):
        y.backward(x.grad)
    return logits


@pytest.mark.parametrize("model", ["moe", "dsa"])
def test_auxiliary_losses_reach_the_gradients_across_stages(model):
    overrides = {} if model == "moe" else DSA_MODEL
    config = TransformerConfig(**((TINY_MODEL if model == "moe" else {}) | overrides | {
        "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}))
    torch.manual_seed(0)
    whole = GPTModel(config, VOCAB, max_sequence_length=SEQ)
    ids, targets = torch.randint(VOCAB, (2, SEQ)), torch.randint(VOCAB, (2, SEQ))
    logits = whole(ids)
    assert whole.auxiliary_loss() > 0
    (F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + whole.auxiliary_loss()).backward()
    expected = {name: p.grad for name, p in whole.named_parameters()}

    chunks = _all_chunks(config)
    assert torch.equal(_chained_backward(chunks, ids, targets), logits)
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7,
                                       msg=lambda m, n=name: f"{n}: {m}")
    assert sum(c.aux_loss_total for c in chunks) == pytest.approx(
        float(whole.auxiliary_loss().detach()), rel=1e-6)

    # without the carrier the router (MoE) / indexer (DSA) weights miss their gradient
    dropped = _all_chunks(config)
    for chunk in dropped:
        chunk.aux_loss_weight = 0.0
    _chained_backward(dropped, ids, targets)
    differ = [name for chunk in dropped for name, p in chunk.named_parameters()
              if not torch.allclose(p.grad, expected[name], rtol=1e-5, atol=1e-7)]
    assert differ


def test_accumulating_one_microbatch_is_the_plain_gradient():
    torch.manual_seed(0)
    model = GPTModel(_config(), VOCAB)
    ids, targets = torch.randint(VOCAB, (4, SEQ)), torch.randint(VOCAB, (4, SEQ))
    loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()) + model.auxiliary_loss()
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ce, aux = accumulate_gradients(model, ids, targets, microbatches=1,
                                   aux_loss=model.auxiliary_loss)
    assert float(ce + aux) == pytest.approx(float(loss.detach()), rel=1e-6)
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# -- 2-process runs with gloo -------------------------------------------------------------------


def _toml(tables: dict[str, dict]) -> str:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def _write_run(directory: Path, name: str, model: dict | None = None,
               parallel: dict | None = None, train: dict | None = None) -> Path:
    path = directory / name
    path.write_text(_toml({"model": TINY_MODEL | (model or {}),
                           "train": TINY_TRAIN | (train or {}),
                           "parallel": {"microbatches": 2} | (parallel or {})}))
    return path


def _args(*argv: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="attnplug train")
    add_train_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _in_process(*argv: object) -> dict:
    """``attnplug train ... --json`` in this process (one thread): its JSON."""
    buffer = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with redirect_stdout(buffer):
            assert run_train(_args(*argv, "--json")) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(buffer.getvalue())


def _torchrun(*argv: object, nproc: int = 2) -> dict:
    """``torchrun --standalone --nproc-per-node N -m attnplug train ... --json``: rank 0's JSON."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "attnplug", "train", *map(str, argv), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """The configs, one process's 4-step run (the reference every layout must match) and its
    checkpoint after one step."""
    directory = tmp_path_factory.mktemp("distributed")
    pp2 = {"pipeline_model_parallel_size": 2}
    paths = {
        "pp2": _write_run(directory, "pp2.toml", model=pp2),
        "pp2_gpipe": _write_run(directory, "gpipe.toml", model=pp2,
                                parallel={"schedule": "gpipe"}),
        "pp2_vpp2": _write_run(directory, "vpp.toml", model=pp2 | {
            "virtual_pipeline_model_parallel_size": 2}),
        "fsdp2": _write_run(directory, "fsdp.toml", parallel={"fsdp": True}),
    }
    reference = _in_process(paths["pp2"])  # one process builds the whole model
    _in_process(paths["pp2"], "--steps", "1", "--save", directory / "one_step.pt")
    return SimpleNamespace(dir=directory, paths=paths, reference=reference)


def _assert_matches(result: dict, reference: dict) -> None:
    """The same losses step for step, and the same evaluations (a pipeline switches between
    training and evaluation at step 2) as the one-process reference."""
    steps = len(result["losses"])
    assert result["losses"] == pytest.approx(reference["losses"][:steps], **LOSS_TOL)
    evals = {e["step"]: e for e in reference["evals"]}
    shared = [e for e in result["evals"] if e["step"] in evals]
    assert shared
    for got in shared:
        want = evals[got["step"]]
        assert got["loss"] == pytest.approx(want["loss"], **LOSS_TOL)
        assert got["accuracy"] == want["accuracy"]
    if steps == len(reference["losses"]):
        assert result["eval_loss"] == pytest.approx(reference["eval_loss"], **LOSS_TOL)
        assert result["aux_loss"] == pytest.approx(reference["aux_loss"], **LOSS_TOL)


def test_pp2_matches_one_process_and_one_process_resumes_its_checkpoint(runs):
    checkpoint = runs.dir / "pp2_checkpoint"
    result = _torchrun(runs.paths["pp2"], "--steps", "3", "--save", checkpoint)
    assert (result["parallel"]["pp"], result["parallel"]["schedule"]) == (2, "1f1b")
    assert result["parameters"] == runs.reference["parameters"]
    _assert_matches(result, runs.reference)
    assert (checkpoint / "train_state.pt").is_file() and (checkpoint / ".metadata").is_file()

    resumed = _in_process(runs.paths["pp2"], "--resume", checkpoint)  # 2 processes -> 1
    _assert_matches(resumed, runs.reference)

    changed = _write_run(runs.dir, "changed.toml", model={"hidden_size": 64})
    with pytest.raises(ConfigError, match=r"\[model\] hidden_size=32 but the config has 64"):
        run_train(_args(changed, "--resume", checkpoint))
    (runs.dir / "not_a_checkpoint").mkdir()
    with pytest.raises(ConfigError, match="a directory, but not an attnplug checkpoint"):
        run_train(_args(runs.paths["pp2"], "--resume", runs.dir / "not_a_checkpoint"))


def test_pp2_vpp2_interleaved_matches_one_process(runs):
    result = _torchrun(runs.paths["pp2_vpp2"], "--steps", "3")
    assert (result["parallel"]["vp"], result["parallel"]["schedule"]) == (2, "interleaved_1f1b")
    _assert_matches(result, runs.reference)


def test_fsdp2_dp2_matches_one_process_and_pipeline_ranks_resume_its_checkpoint(runs):
    checkpoint = runs.dir / "fsdp2_checkpoint"
    result = _torchrun(runs.paths["fsdp2"], "--steps", "3", "--save", checkpoint)
    assert (result["parallel"]["dp"], result["parallel"]["fsdp"]) == (2, True)
    assert result["parameters"] == runs.reference["parameters"]
    _assert_matches(result, runs.reference)

    # 2 FSDP ranks' shards -> 2 pipeline ranks' layers (GPipe)
    resumed = _torchrun(runs.paths["pp2_gpipe"], "--resume", checkpoint)
    assert (resumed["parallel"]["pp"], resumed["parallel"]["schedule"]) == (2, "gpipe")
    _assert_matches(resumed, runs.reference)


def test_fsdp2_ranks_resume_a_one_process_checkpoint(runs):
    result = _torchrun(runs.paths["fsdp2"], "--resume", runs.dir / "one_step.pt")  # 1 -> 2
    _assert_matches(result, runs.reference)


def test_fsdp2_keeps_parameters_of_another_dtype_whole_and_sums_their_gradients(runs):
    # a bfloat16 model whose Gated DeltaNet keeps A_log and dt_bias in float32: FSDP2 shards
    # one dtype per group, so those stay whole on each rank (without the sum of their
    # gradients over the ranks the losses drift by ~1e-5 from one process's)
    bf16 = {"params_dtype": "bfloat16"}
    no_clip = {"grad_clip": 0.0}  # torch's clipping norms bfloat16 gradients in bfloat16
    one = _write_run(runs.dir, "bf16_one.toml", model=bf16, train=no_clip)
    fsdp = _write_run(runs.dir, "bf16_fsdp.toml", model=bf16, train=no_clip,
                      parallel={"fsdp": True})
    reference = _in_process(one, "--steps", "3")
    result = _torchrun(fsdp, "--steps", "3")
    assert result["losses"] == pytest.approx(reference["losses"], rel=1e-6)
