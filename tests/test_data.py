"""The synthetic tasks of ``attnplug train``: layouts, targets and reproducibility."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnplug._errors import ConfigError
from attnplug.data import (
    BRACKET_TYPES,
    COPY,
    DOC,
    FIRST_BRACKET,
    FIRST_WORD,
    IGNORE_INDEX,
    LM_MIN_VOCAB,
    PASTE,
    LMTask,
    MQARTask,
    make_task,
    mqar_batch,
    mqar_vocab,
    stream_seed,
    synthetic_corpus,
)
from attnplug.train import TrainConfig


def _mqar(**kw) -> MQARTask:
    args = dict(vocab_size=33, seq_len=24, num_kv_pairs=4, batch_size=8, seed=0) | kw
    return MQARTask(**args)


def _lm(**kw) -> LMTask:
    args = dict(vocab_size=48, seq_len=32, batch_size=4, seed=0, corpus_tokens=20_000,
                corpus_seed=0) | kw
    return LMTask(**args)


# -- MQAR ---------------------------------------------------------------------------------------


def _check_mqar_batch(inputs, targets, seq_len, pairs, vocab_size):
    num_keys, _ = mqar_vocab(vocab_size)
    assert inputs.shape == targets.shape == (inputs.shape[0], seq_len)
    assert inputs.dtype == targets.dtype == torch.long
    for row_in, row_t in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = row_in[0 : 2 * pairs : 2], row_in[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k <= num_keys for k in keys)
        assert all(num_keys < v < vocab_size for v in values)
        paired = dict(zip(keys, values, strict=True))
        queried = [t for t, target in enumerate(row_t) if target != IGNORE_INDEX]
        # one query per key, after the pairs, each asking for its key's paired value
        assert len(queried) == pairs and min(queried) >= 2 * pairs
        assert sorted(row_in[t] for t in queried) == sorted(keys)
        assert all(row_t[t] == paired[row_in[t]] for t in queried)
        fillers = set(range(2 * pairs, seq_len)) - set(queried)
        assert all(row_in[t] == 0 for t in fillers)


def test_mqar_targets_only_at_queries_and_each_is_the_paired_value():
    task = _mqar()
    inputs, targets = task.train_batch(0)
    _check_mqar_batch(inputs, targets, 24, 4, 33)


@settings(max_examples=40, deadline=None)
@given(pairs=st.integers(1, 8), extra_len=st.integers(0, 20), extra_vocab=st.integers(0, 20),
       batch=st.integers(1, 4), seed=st.integers(0, 2**32))
def test_mqar_layout_holds_for_any_sizes(pairs, extra_len, extra_vocab, batch, seed):
    seq_len, vocab = 3 * pairs + extra_len, 2 * pairs + 1 + extra_vocab
    gen = torch.Generator().manual_seed(seed)
    inputs, targets = mqar_batch(gen, batch, seq_len, pairs, vocab)
    _check_mqar_batch(inputs, targets, seq_len, pairs, vocab)


def test_mqar_query_order_and_positions_vary():
    inputs, targets = _mqar(batch_size=64).train_batch(0)
    first_query = (targets != IGNORE_INDEX).int().argmax(dim=1)
    assert len(set(first_query.tolist())) > 1
    first_key_queried_first = inputs[torch.arange(64), first_query] == inputs[:, 0]
    assert 0 < int(first_key_queried_first.sum()) < 64


def test_mqar_batches_are_a_function_of_seed_and_step():
    a, b = _mqar(seed=3), _mqar(seed=3)
    for step in (0, 1, 17):
        assert all(torch.equal(x, y) for x, y in zip(a.train_batch(step), b.train_batch(step),
                                                     strict=True))
    assert not torch.equal(a.train_batch(0)[0], a.train_batch(1)[0])
    assert not torch.equal(a.train_batch(0)[0], _mqar(seed=4).train_batch(0)[0])
    assert not torch.equal(a.train_batch(0)[0], a.eval_batch(0)[0])
    assert torch.equal(a.eval_batch(2)[1], b.eval_batch(2)[1])


def test_mqar_chance_is_one_over_the_number_of_values():
    assert mqar_vocab(33) == (16, 16)
    assert _mqar(vocab_size=33).chance_accuracy == pytest.approx(1 / 16)


@pytest.mark.parametrize(("kw", "field"), [
    ({"vocab_size": 8, "num_kv_pairs": 4}, "[train] vocab_size=8"),
    ({"seq_len": 11, "num_kv_pairs": 4}, "[train] seq_len=11"),
])
def test_mqar_sizes_that_cannot_be_laid_out_are_refused(kw, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        _mqar(**kw)


def test_stream_seed_is_stable_and_distinct():
    assert stream_seed(0, "train", 0) == stream_seed(0, "train", 0)
    seeds = {stream_seed(s, split, i) for s in range(3) for split in ("train", "eval")
             for i in range(50)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)


# -- the generated corpus -----------------------------------------------------------------------


def test_corpus_is_deterministic_from_its_seed():
    first = synthetic_corpus(48, 5000, 7).clone()
    synthetic_corpus.cache_clear()
    assert torch.equal(first, synthetic_corpus(48, 5000, 7))
    assert not torch.equal(first, synthetic_corpus(48, 5000, 8))
    assert first.dtype == torch.long and first.shape == (5000,)
    assert 0 <= int(first.min()) and int(first.max()) < 48
    assert int((first >= FIRST_WORD).sum()) > 2500


def _documents(tokens: list[int]) -> list[list[int]]:
    docs: list[list[int]] = []
    for tok in tokens:
        if tok == DOC:
            docs.append([])
        elif docs:
            docs[-1].append(tok)
    return docs[:-1]  # the last one may be cut off


def test_corpus_brackets_match_and_close_by_the_end_of_each_document():
    docs = _documents(synthetic_corpus(48, 20_000, 0).tolist())
    assert len(docs) > 10
    for doc in docs:
        stack = []
        for tok in doc:
            if FIRST_BRACKET <= tok < FIRST_WORD:
                kind, closing = divmod(tok - FIRST_BRACKET, 2)
                if closing:
                    assert stack.pop() == kind
                else:
                    stack.append(kind)
        assert stack == []
    assert FIRST_WORD == FIRST_BRACKET + 2 * BRACKET_TYPES


def test_corpus_copy_spans_are_pasted_verbatim():
    tokens = synthetic_corpus(48, 20_000, 0).tolist()
    starts = [i for i, tok in enumerate(tokens) if tok == COPY]
    assert len(starts) > 10
    for start in starts[:-1]:
        paste = tokens.index(PASTE, start)
        span = tokens[start + 1 : paste]
        assert 3 <= len(span) <= 8 and all(tok >= FIRST_WORD for tok in span)
        assert tokens[paste + 1 : paste + 1 + len(span)] == span


def test_lm_batches_are_shifted_corpus_windows_and_eval_is_held_out():
    task = _lm()
    inputs, targets = task.train_batch(5)
    assert inputs.shape == targets.shape == (4, 32)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    corpus = task.corpus
    cut = 20_000 - 2_000
    for row in torch.cat([inputs, targets[:, -1:]], dim=1):
        windows = corpus[:cut].unfold(0, 33, 1)
        assert bool((windows == row).all(dim=1).any())
    held_out = task.eval_batch(0)[0]
    assert bool((corpus[cut:].unfold(0, 32, 1) == held_out[0]).all(dim=1).any())
    assert all(torch.equal(x, y) for x, y in zip(task.train_batch(5), _lm().train_batch(5),
                                                 strict=True))


@pytest.mark.parametrize(("kw", "field"), [
    ({"vocab_size": LM_MIN_VOCAB - 1}, f"vocab_size={LM_MIN_VOCAB - 1}"),
    ({"corpus_tokens": 300}, "lm_corpus_tokens=300"),
])
def test_lm_sizes_that_cannot_work_are_refused(kw, field):
    with pytest.raises(ConfigError, match=field):
        _lm(**kw)


def test_make_task_follows_the_train_table():
    mqar = make_task(TrainConfig(task="mqar", vocab_size=21, num_kv_pairs=3, seq_len=16))
    assert isinstance(mqar, MQARTask) and mqar.vocab_size == 21 and mqar.num_kv_pairs == 3
    lm = make_task(TrainConfig(task="lm", vocab_size=40, lm_corpus_tokens=5000, seq_len=16))
    assert isinstance(lm, LMTask) and lm.vocab_size == 40 and lm.chance_accuracy is None
    assert lm.train_batch(0)[0].shape == (32, 16)
