"""Synthetic tasks for ``attnplug train``: what a hybrid stack is good at, generated on the spot.

Two tasks, both without downloads and both reproducible from ``(seed, step)``: batch ``k`` of a run
is a pure function of the seed and ``k``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.

- ``"mqar"``: multi-query associative recall (Zoology, Arora et al. 2023). A sequence opens with
  ``num_kv_pairs`` key/value pairs ``k1 v1 k2 v2 ...``; later, at random positions among filler
  tokens, each key appears once more (in random order) and the model must predict the value that
  was paired with it. Loss and accuracy count the queried positions only (targets are ``-100``
  elsewhere). Softmax attention solves it exactly; a fixed-size recurrent state (Gated DeltaNet)
  must store the pairs, which is why hybrids mix the two.
- ``"lm"``: next-token prediction on a corpus generated from a seeded probabilistic grammar (see
  :func:`synthetic_corpus`): a first-order Markov source over "words" for local structure, plus
  nested typed brackets and copy spans whose tokens are fully determined by context far back.

Token layouts:

- MQAR: ``0`` filler, keys ``1 .. num_keys``, values after them (disjoint ranges);
  ``num_keys = (vocab_size - 1) // 2``, the remaining ids are values. Chance accuracy is
  ``1 / num_values``.
- LM: ``0`` ``<doc>``, ``1`` ``<copy>``, ``2`` ``<paste>``, then an open/close id per bracket type,
  then words.
"""

from __future__ import annotations

import functools
import hashlib
import random
from typing import Any, Protocol

import attrs
import torch

from attnplug._errors import ConfigError

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Task",
    "MQARTask",
    "LMTask",
    "make_task",
    "stream_seed",
    "mqar_batch",
    "synthetic_corpus",
    "LM_MIN_VOCAB",
]

IGNORE_INDEX = -100
TASKS = ("mqar", "lm")

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids[B, T], targets[B, T]), int64


class Task(Protocol):
    """What the training loop needs from a task."""

    name: str
    vocab_size: int

    @property
    def chance_accuracy(self) -> float | None:
        """The accuracy of a uniform guess over the answers, or ``None`` where it means little."""

    def train_batch(self, step: int) -> Batch:
        """The training batch of step ``step`` (0-based): a pure function of the seed and step."""

    def eval_batch(self, index: int) -> Batch:
        """Held-out batch number ``index``: the same batch every time it is asked for."""


def stream_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit generator seed for batch ``index`` of ``split``, stable across runs and platforms.

    Returns:
        An int in ``[0, 2**63)``, different for every ``(seed, split, index)`` in practice.
    """
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(seed: int, split: str, index: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(stream_seed(seed, split, index))
    return gen


def _random_subset(gen: torch.Generator, rows: int, population: int, size: int) -> torch.Tensor:
    """``size`` distinct integers from ``range(population)`` per row, in random order."""
    scores = torch.rand(rows, population, generator=gen)  # (rows, population)
    return scores.argsort(dim=1, stable=True)[:, :size]  # (rows, size)


# -- MQAR ---------------------------------------------------------------------------------------


def mqar_vocab(vocab_size: int) -> tuple[int, int]:
    """``(num_keys, num_values)`` for an MQAR vocabulary of ``vocab_size`` ids (id 0 is filler)."""
    num_keys = (vocab_size - 1) // 2
    return num_keys, vocab_size - 1 - num_keys


def check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    """Raise ``ConfigError`` naming the ``[train]`` field when MQAR cannot be laid out.

    Each sequence needs ``num_kv_pairs`` distinct keys and room for the pairs and one query per
    key: ``vocab_size >= 2 * num_kv_pairs + 1`` and ``seq_len >= 3 * num_kv_pairs``.
    """
    if mqar_vocab(vocab_size)[0] < num_kv_pairs:
        raise ConfigError(
            f"[train] vocab_size={vocab_size} is not accepted for task 'mqar' with "
            f"num_kv_pairs={num_kv_pairs}: expected at least {2 * num_kv_pairs + 1} (one filler "
            "id, then distinct keys and values)"
        )
    if seq_len < 3 * num_kv_pairs:
        raise ConfigError(
            f"[train] seq_len={seq_len} is not accepted for task 'mqar' with num_kv_pairs="
            f"{num_kv_pairs}: expected at least {3 * num_kv_pairs} (the pairs, then one query "
            "per key)"
        )


def mqar_batch(
    gen: torch.Generator, batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int
) -> Batch:
    """One MQAR batch drawn from ``gen``.

    Positions ``0 .. 2P-1`` hold the pairs ``k1 v1 .. kP vP`` (distinct keys, values drawn with
    replacement); each key is queried once at a distinct random position in ``[2P, seq_len)``,
    the rest is filler ``0``. ``targets[b, t]`` is the paired value where ``t`` is a query and
    ``-100`` elsewhere (the model predicts the value from the query key itself).

    Returns:
        ``(input_ids[B, T], targets[B, T])``, both int64.
    """
    num_keys, num_values = mqar_vocab(vocab_size)
    B, T, P = batch_size, seq_len, num_kv_pairs
    keys = _random_subset(gen, B, num_keys, P) + 1  # (B, P), distinct per row
    values = torch.randint(num_values, (B, P), generator=gen) + 1 + num_keys  # (B, P)
    query_pos = _random_subset(gen, B, T - 2 * P, P) + 2 * P  # (B, P): where key i is queried
    inputs = torch.zeros(B, T, dtype=torch.long)
    inputs[:, 0 : 2 * P : 2] = keys
    inputs[:, 1 : 2 * P : 2] = values
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    return inputs, targets


@attrs.frozen(kw_only=True)
class MQARTask:
    """Multi-query associative recall; see the module docstring for the layout."""

    vocab_size: int
    seq_len: int
    num_kv_pairs: int
    batch_size: int
    seed: int
    name: str = attrs.field(default="mqar", init=False)

    def __attrs_post_init__(self) -> None:
        check_mqar(self.vocab_size, self.seq_len, self.num_kv_pairs)

    @property
    def chance_accuracy(self) -> float:
        """``1 / num_values``: a uniform guess among the value ids."""
        return 1.0 / mqar_vocab(self.vocab_size)[1]

    def _batch(self, split: str, index: int) -> Batch:
        gen = _generator(self.seed, split, index)
        return mqar_batch(gen, self.batch_size, self.seq_len, self.num_kv_pairs, self.vocab_size)

    def train_batch(self, step: int) -> Batch:
        """The batch of training step ``step``; see :class:`Task`."""
        return self._batch("train", step)

    def eval_batch(self, index: int) -> Batch:
        """Held-out batch ``index`` (drawn from its own stream, never a training batch)."""
        return self._batch("eval", index)


# -- language modelling on a generated corpus ----------------------------------------------------

DOC, COPY, PASTE = 0, 1, 2
BRACKET_TYPES = 4
FIRST_BRACKET = 3
FIRST_WORD = FIRST_BRACKET + 2 * BRACKET_TYPES
MIN_WORDS = 16
LM_MIN_VOCAB = FIRST_WORD + MIN_WORDS
EVAL_FRACTION = 0.1


@attrs.frozen
class _Grammar:
    """The probabilistic source behind :func:`synthetic_corpus` (its knobs are fixed)."""

    num_words: int
    successors: tuple[tuple[int, ...], ...]  # per word, the words that may follow it
    p_open: float = 0.06
    p_close: float = 0.12
    p_copy: float = 0.02
    max_depth: int = 6
    copy_len: tuple[int, int] = (3, 8)
    doc_len: tuple[int, int] = (64, 512)

    # Zipf-like weights over each word's successors: 1, 1/2, 1/3, 1/4
    WEIGHTS = (12 / 25, 6 / 25, 4 / 25, 3 / 25)


def _below(rng: random.Random, n: int) -> int:
    """A uniform int in ``[0, n)`` from ``rng.random()`` alone (stable across Python versions)."""
    return min(int(rng.random() * n), n - 1)


def _between(rng: random.Random, bounds: tuple[int, int]) -> int:
    return bounds[0] + _below(rng, bounds[1] - bounds[0] + 1)


def _make_grammar(num_words: int, rng: random.Random) -> _Grammar:
    successors = []
    for _ in range(num_words):
        pool = list(range(num_words))
        picks = [pool.pop(_below(rng, len(pool))) for _ in range(len(_Grammar.WEIGHTS))]
        successors.append(tuple(picks))
    return _Grammar(num_words=num_words, successors=tuple(successors))


def _next_word(grammar: _Grammar, rng: random.Random, word: int) -> int:
    u = rng.random()
    for weight, successor in zip(grammar.WEIGHTS, grammar.successors[word], strict=True):
        u -= weight
        if u < 0:
            return successor
    return grammar.successors[word][-1]


def _document(grammar: _Grammar, rng: random.Random) -> list[int]:
    """One document: ``<doc>``, then words, brackets and copy spans; open brackets close last."""
    out = [DOC]
    stack: list[int] = []
    word = _below(rng, grammar.num_words)
    length = _between(rng, grammar.doc_len)
    while len(out) < length:
        u = rng.random()
        if stack and u < grammar.p_close:
            out.append(FIRST_BRACKET + 2 * stack.pop() + 1)
        elif len(stack) < grammar.max_depth and u < grammar.p_close + grammar.p_open:
            stack.append(_below(rng, BRACKET_TYPES))
            out.append(FIRST_BRACKET + 2 * stack[-1])
        elif u < grammar.p_close + grammar.p_open + grammar.p_copy:
            span = []
            for _ in range(_between(rng, grammar.copy_len)):
                word = _next_word(grammar, rng, word)
                span.append(FIRST_WORD + word)
            out += [COPY, *span, PASTE, *span]
        else:
            word = _next_word(grammar, rng, word)
            out.append(FIRST_WORD + word)
    out += [FIRST_BRACKET + 2 * kind + 1 for kind in reversed(stack)]
    return out


def _check_lm_vocab(vocab_size: int) -> None:
    if vocab_size < LM_MIN_VOCAB:
        raise ConfigError(
            f"[train] vocab_size={vocab_size} is not accepted for task 'lm': expected at least "
            f"{LM_MIN_VOCAB} ({FIRST_WORD} structural tokens and {MIN_WORDS} words)"
        )


@functools.lru_cache(maxsize=4)
def synthetic_corpus(vocab_size: int, num_tokens: int, seed: int) -> torch.Tensor:
    """A deterministic corpus of ``num_tokens`` token ids from a seeded probabilistic grammar.

    Documents (64 to 512 tokens, each opened by ``<doc>``) are a walk of a first-order Markov
    chain over ``vocab_size - 11`` words (each word has 4 possible successors with weights
    1 : 1/2 : 1/3 : 1/4, drawn from ``seed``), interleaved with

    - typed brackets (4 types, nesting up to 6 deep): a closing bracket always matches the most
      recent open one, however far back, and all open brackets close at the end of the document;
    - copy spans ``<copy> w1 .. wn <paste> w1 .. wn`` (n = 3 .. 8): after ``<paste>`` the next
      n tokens are determined by the span before it (the induction-head pattern).

    A bigram model cannot predict the closing brackets or the pasted spans; a model with
    long-range memory can. For orientation, at ``vocab_size=64`` a unigram model scores about
    4.04 nats per held-out token and a bigram model about 2.28. The same arguments give the same
    tensor (cached; do not modify it).

    Returns:
        A 1-D int64 tensor of length ``num_tokens`` with ids in ``[0, vocab_size)``.

    Raises:
        ConfigError: ``vocab_size < LM_MIN_VOCAB``.
    """
    _check_lm_vocab(vocab_size)
    rng = random.Random(seed)
    grammar = _make_grammar(vocab_size - FIRST_WORD, rng)
    tokens: list[int] = []
    while len(tokens) < num_tokens:
        tokens += _document(grammar, rng)
    return torch.tensor(tokens[:num_tokens], dtype=torch.long)


def check_lm(vocab_size: int, seq_len: int, corpus_tokens: int) -> None:
    """Raise ``ConfigError`` naming the ``[train]`` field when the LM task cannot be set up.

    The vocabulary must hold the structural tokens and at least 16 words, and the held-out tenth
    of the corpus must hold at least one window of ``seq_len + 1`` tokens.
    """
    _check_lm_vocab(vocab_size)
    needed = int((seq_len + 1) / EVAL_FRACTION) + 1
    if corpus_tokens < needed:
        raise ConfigError(
            f"[train] lm_corpus_tokens={corpus_tokens} is not accepted with seq_len={seq_len}: "
            f"expected at least {needed} (the held-out tenth must hold one window of seq_len + 1)"
        )


def _windows(corpus: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Batch:
    index = starts[:, None] + torch.arange(seq_len + 1)  # (B, T + 1)
    tokens = corpus[index]  # (B, T + 1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


@attrs.frozen(kw_only=True)
class LMTask:
    """Next-token prediction on :func:`synthetic_corpus`; the last tenth is held out for eval."""

    vocab_size: int
    seq_len: int
    batch_size: int
    seed: int
    corpus_tokens: int
    corpus_seed: int
    name: str = attrs.field(default="lm", init=False)

    def __attrs_post_init__(self) -> None:
        check_lm(self.vocab_size, self.seq_len, self.corpus_tokens)

    @property
    def chance_accuracy(self) -> None:
        """``None``: next-token accuracy has no single chance level."""
        return None

    @property
    def corpus(self) -> torch.Tensor:
        """The whole generated corpus (1-D int64)."""
        return synthetic_corpus(self.vocab_size, self.corpus_tokens, self.corpus_seed)

    def _split(self, split: str) -> torch.Tensor:
        cut = self.corpus_tokens - int(self.corpus_tokens * EVAL_FRACTION)
        return self.corpus[:cut] if split == "train" else self.corpus[cut:]

    def _batch(self, split: str, index: int) -> Batch:
        part = self._split(split)
        gen = _generator(self.seed, split, index)
        starts = torch.randint(len(part) - self.seq_len, (self.batch_size,), generator=gen)
        return _windows(part, starts, self.seq_len)

    def train_batch(self, step: int) -> Batch:
        """Random windows of the training part for step ``step``; see :class:`Task`."""
        return self._batch("train", step)

    def eval_batch(self, index: int) -> Batch:
        """Random windows of the held-out part, the same for every call with ``index``."""
        return self._batch("eval", index)


def make_task(cfg: Any) -> MQARTask | LMTask:
    """The task a ``[train]`` table asks for.

    Args:
        cfg: a :class:`attnplug.train.TrainConfig` (or anything with its fields).

    Returns:
        An :class:`MQARTask` or :class:`LMTask`; its ``vocab_size`` sizes the model.

    Raises:
        ConfigError: an unknown task or sizes the task cannot use.
    """
    if cfg.task == "mqar":
        return MQARTask(vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                        num_kv_pairs=cfg.num_kv_pairs, batch_size=cfg.batch_size, seed=cfg.seed)
    if cfg.task == "lm":
        return LMTask(vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                      seed=cfg.seed, corpus_tokens=cfg.lm_corpus_tokens,
                      corpus_seed=cfg.lm_corpus_seed)
    raise ConfigError(
        f"[train] task={cfg.task!r} is not accepted: expected one of "
        + ", ".join(repr(t) for t in TASKS)
    )
