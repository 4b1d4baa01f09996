"""Proposal operators: where a round's new candidates come from, and how the round's budget is
split between them.

- ``rewrite`` and ``edit``: the LLM prompts (mils_pipeline/generate/prompts.py); they cost
  completion and prompt tokens.
- ``mutate``: one word of a kept caption replaced by a word seen in the same context in the seed
  pool or the item's own candidates: between the same two neighbours, and with every run of
  three words the replacement makes seen there too. No LLM tokens; it costs text encodes only.
- ``crossover``: two kept captions spliced at words they share: the head of one and the tail of
  the other, or a phrase of one put in place of the other's phrase between the same two words;
  each junction is a bigram one of them already had.

The operators know no world: their vocabulary and contexts come only from the pool and the
candidates. The ``Allocator`` is a bandit per item: each round it splits the item's proposal
budget across operators by the score gain each has bought per unit of cost so far (an upper
confidence bound, so an operator that has not paid yet keeps a small share until it is known).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mils_pipeline.text import normalise_text

LLM_OPERATORS = ("rewrite", "edit")
WORD_OPERATORS = ("mutate", "crossover")
OPERATORS = (*LLM_OPERATORS, *WORD_OPERATORS)
_START, _END = "<s>", "</s>"


def words(text: str) -> list[str]:
    return normalise_text(text).split()


class WordContexts:
    """Which words were seen between which neighbours, and which word pairs were seen, in the
    texts added so far (sentence start and end count as neighbours)."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.between: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.bigrams: set[tuple[str, str]] = set()
        self.trigrams: set[tuple[str, str, str]] = set()
        self.seen_in: dict[str, set[tuple[str, str]]] = defaultdict(set)  # word -> its (left, right) pairs
        self._similar: dict[tuple[str, str], float] = {}
        self.add(texts)

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            tokens = [_START, *words(text), _END]
            self.bigrams.update(itertools.pairwise(tokens))
            self.trigrams.update(zip(tokens, tokens[1:], tokens[2:], strict=False))
            for left, word, right in zip(tokens, tokens[1:], tokens[2:], strict=False):
                self.between[(left, right)].add(word)
                self.seen_in[word].add((left, right))
        self._similar.clear()

    def words_between(self, left: str, right: str) -> set[str]:
        return self.between.get((left, right), set())

    def has_bigram(self, left: str, right: str) -> bool:
        return (left, right) in self.bigrams

    def has_trigram(self, first: str, second: str, third: str) -> bool:
        return (first, second, third) in self.trigrams

    def contexts_of(self, word: str) -> set[tuple[str, str]]:
        return self.seen_in.get(word, set())

    def similarity(self, first: str, second: str) -> float:
        """How interchangeable two words are: the Jaccard similarity of the sets of (left, right)
        neighbour pairs each was seen between. Words of one kind (two colours, two shapes, left and
        right) share many (0.3-0.6 on the toy-scenes pool); a noun of another kind that fits some of
        the same places (a background after a colour, like a shape) and function words, seen in
        many places, share a smaller part of theirs (under 0.25)."""
        return _cached_similarity(self, self._similar, first, second)


def _cached_similarity(contexts, cache: dict[tuple[str, str], float], first: str, second: str) -> float:
    key = (first, second) if first <= second else (second, first)
    value = cache.get(key)
    if value is None:
        a, b = contexts.contexts_of(first), contexts.contexts_of(second)
        value = cache[key] = len(a & b) / len(a | b) if a and b else 0.0
    return value


class ItemContexts:
    """The seed pool's contexts (shared by every item, built once) plus one item's own
    candidates' (the LLM's proposals bring words and contexts the pool lacks)."""

    def __init__(self, pool: WordContexts) -> None:
        self.pool = pool
        self.own = WordContexts()
        self._similar: dict[tuple[str, str], float] = {}

    def add(self, texts: Iterable[str]) -> None:
        self.own.add(texts)
        self._similar.clear()

    def words_between(self, left: str, right: str) -> set[str]:
        return self.pool.words_between(left, right) | self.own.words_between(left, right)

    def has_bigram(self, left: str, right: str) -> bool:
        return self.pool.has_bigram(left, right) or self.own.has_bigram(left, right)

    def has_trigram(self, first: str, second: str, third: str) -> bool:
        return self.pool.has_trigram(first, second, third) or self.own.has_trigram(first, second, third)

    def contexts_of(self, word: str) -> set[tuple[str, str]]:
        own = self.own.contexts_of(word)
        return self.pool.contexts_of(word) | own if own else self.pool.contexts_of(word)

    def similarity(self, first: str, second: str) -> float:
        if not self.own.seen_in:
            return self.pool.similarity(first, second)
        return _cached_similarity(self, self._similar, first, second)


def mutations(text: str, contexts: WordContexts | ItemContexts, max_words: int, similarity: float = 0.0) -> list[str]:
    """Every one-word replacement in ``text`` whose every new run of three words was seen (in the
    pool or the candidates, sentence start and end counting as words): the new word stood between
    the same two neighbours, after the same two words before it and before the same two after it.
    With ``similarity`` > 0 the new word must also be interchangeable with the old one across all the
    texts of ``contexts`` (the pool, and an item's LLM proposals: ``similarity`` at least that): a
    colour for a colour, a shape for a shape, never a noun of another kind that fits the local context.

    Replacements only: on the benchmark, insertions and deletions (and replacements checked on
    the two neighbours alone) let captions drift into phrases a judge likes and the references
    do not use (docs/QUALITY.md)."""
    tokens = [_START, *words(text), _END]
    out: list[str] = []
    for i in range(1, len(tokens) - 1):
        left, right = tokens[i - 1], tokens[i + 1]
        for word in sorted(contexts.words_between(left, right)):
            if word == tokens[i]:
                continue
            if similarity > 0 and contexts.similarity(tokens[i], word) < similarity:
                continue
            if i >= 2 and not contexts.has_trigram(tokens[i - 2], left, word):
                continue
            if i + 2 < len(tokens) and not contexts.has_trigram(word, right, tokens[i + 2]):
                continue
            out.append(" ".join([*tokens[1:i], word, *tokens[i + 1 : -1]]))
    return [t for t in dict.fromkeys(out) if len(t.split()) <= max_words]


def crossovers(first: str, second: str, max_words: int) -> list[str]:
    """Children of two captions that keep every junction a word pair one parent already had:
    the head of one up to a word both share, then the other's tail from that word (one point);
    or one's span between two shared words replaced by the other's span between the same two
    words (two points: a phrase of one caption put into the other)."""
    a, b = words(first), words(second)
    first, second = " ".join(a), " ".join(b)
    out: list[str] = []
    for x, y in ((a, b), (b, a)):
        shared = [(i, j) for i, word in enumerate(x) for j, other in enumerate(y) if word == other]
        for i, j in shared:
            if (i, j) != (0, 0):
                out.append(" ".join([*x[:i], *y[j:]]))
        for i, j in shared:  # x[:i] + y[j:end] + x[k:], where x[k] == y[end] closes the span
            for k, end in shared:
                if k > i and end > j and (k - i, end - j) != (1, 1):
                    out.append(" ".join([*x[:i], *y[j:end], *x[k:]]))
    # a child no longer than its longer parent: splicing must not grow captions without bound
    longest = min(max(len(a), len(b)), max_words)
    return [t for t in dict.fromkeys(out) if t not in (first, second) and 0 < len(t.split()) <= longest]


def word_proposals(
    operator: str,
    top: Sequence[str],
    contexts: WordContexts | ItemContexts,
    count: int,
    max_words: int,
    exclude: set[str],
    rng: random.Random,
    similarity: float = 0.0,
) -> list[str]:
    """Up to ``count`` new texts from a word operator over the kept captions ``top`` (best first):
    parents are drawn with a bias to the best, and every text is new to the item."""
    if count <= 0 or not top:
        return []
    if operator == "mutate":
        sources: list[tuple[str, ...]] = [(parent,) for parent in top]
    elif operator == "crossover":
        sources = [(first, second) for i, first in enumerate(top) for second in top[i + 1 :]]
    else:
        raise ValueError(f"{operator!r} is not a word operator")

    def variants(source: tuple[str, ...]) -> list[str]:
        if operator == "mutate":
            return mutations(source[0], contexts, max_words, similarity)
        return crossovers(source[0], source[1], max_words)

    # Draw from the parents' lists in turn, the better parents more often (weight 1 / (rank + 1)):
    # a local search around the best caption that still looks around the runners-up. A list is
    # made when first drawn from: with many parents most pairs are never reached.
    weights = [1.0 / (rank + 1) for rank in range(len(sources))]
    lists: list[list[str] | None] = [None] * len(sources)
    cursors = [0] * len(sources)
    open_lists = list(range(len(sources)))
    out: list[str] = []
    while len(out) < count and open_lists:
        position = rng.choices(range(len(open_lists)), weights=[weights[j] for j in open_lists])[0]
        i = open_lists[position]
        chosen = lists[i]
        if chosen is None:
            chosen = lists[i] = variants(sources[i])
            rng.shuffle(chosen)
        if cursors[i] >= len(chosen):
            open_lists.pop(position)
            continue
        text = chosen[cursors[i]]
        cursors[i] += 1
        key = normalise_text(text)
        if key not in exclude:
            exclude.add(key)
            out.append(text)
    return out


@dataclass
class _Arm:
    rounds: int = 0  # rounds in which the operator proposed for this item
    cost: float = 0.0  # in cost units (GPU-seconds-equivalent, mils_pipeline/costs.py)
    gain: float = 0.0  # how far its proposals raised the item's best score

    def add(self, cost: float, gain: float) -> None:
        self.rounds += 1
        self.cost += cost
        self.gain += max(0.0, gain)


class RunPrior:
    """What each operator has cost and bought over the items of one run so far (every round of
    every item, credited as it happens); new items' allocators start from it."""

    def __init__(self) -> None:
        self.arms: dict[str, _Arm] = defaultdict(_Arm)

    def record(self, name: str, cost: float, gain: float) -> None:
        self.arms[name].add(cost, gain)


@dataclass
class RoundPlan:
    """What one item spends in one round: the LLM prompt to send (or none) and the word
    operators' proposal counts; ``llm_cost`` is filled in once the reply's tokens are known."""

    llm: str | None
    words: dict[str, int]
    llm_cost: float = 0.0


class Allocator:
    """A per-item bandit over operators, valued by the gain each has bought per unit of cost.

    An LLM prompt is one indivisible spend per round: the item sends one when the LLM has not been
    tried yet, or when the LLM's value is at least every word operator's; with no word operator
    enabled it sends one every round (the paper's loop). Several LLM operators (rewrite, edit)
    take turns, and share one value. The word operators share ``word_budget`` proposals in proportion to their
    values, each keeping ``floor`` proposals, so one that has not paid yet stays in sight.
    Values are upper confidence bounds: gain per cost times ``1 + exploration * sqrt(ln t / n)``.
    """

    def __init__(
        self,
        operators: Sequence[str],
        word_budget: int,
        exploration: float = 1.0,
        floor: int = 2,
        prior: RunPrior | None = None,
    ) -> None:
        """``prior``: what the operators bought for the items of this run that came before; each
        operator it has seen starts with one round's worth of its average, so a new item does not
        pay again to try an operator that has not paid on the others."""
        unknown = [o for o in operators if o not in OPERATORS]
        if unknown:
            raise ValueError(f"unknown operators {unknown}; choose from {list(OPERATORS)}")
        self.llm = [o for o in operators if o in LLM_OPERATORS]
        self.word = [o for o in operators if o in WORD_OPERATORS]
        self.word_budget = word_budget
        self.exploration = exploration
        self.floor = floor
        self.arms = {name: _Arm() for name in operators}
        if prior is not None:
            for name in operators:
                seen = prior.arms.get(name)
                if seen is not None and seen.rounds > 0:
                    self.arms[name] = _Arm(1, seen.cost / seen.rounds, seen.gain / seen.rounds)
        self.rounds = 0
        self.run = prior  # this item's rounds are added to the run's record as they happen

    def value(self, name: str) -> float:
        arm = self.arms[name]
        if arm.rounds == 0:
            return math.inf
        rate = arm.gain / max(arm.cost, 1e-12)
        return rate * (1 + self.exploration * math.sqrt(math.log(self.rounds + 1) / arm.rounds))

    def plan(self, llm_rounds: int) -> RoundPlan:
        """This round's spend; ``llm_rounds``: LLM prompts the item has had (for the turns)."""
        values = {name: self.value(name) for name in self.arms}
        llm = self.llm[llm_rounds % len(self.llm)] if self.llm else None
        if llm is not None and self.word:
            llm_value = self._llm_value()
            best_word = max(values[w] for w in self.word)
            if not (math.isinf(llm_value) or (llm_value > 0 and llm_value >= best_word)):
                llm = None
        return RoundPlan(llm=llm, words=self._word_shares(values))

    def _llm_value(self) -> float:
        """The LLM operators' value as one arm: their gains and costs pooled."""
        tried = [self.arms[o] for o in self.llm if self.arms[o].rounds]
        if not tried:
            return math.inf
        rounds = sum(a.rounds for a in tried)
        rate = sum(a.gain for a in tried) / max(sum(a.cost for a in tried), 1e-12)
        return rate * (1 + self.exploration * math.sqrt(math.log(self.rounds + 1) / rounds))

    def _word_shares(self, values: dict[str, float]) -> dict[str, int]:
        if not self.word or self.word_budget <= 0:
            return {}
        shares = dict.fromkeys(self.word, min(self.floor, self.word_budget // len(self.word)))
        remaining = self.word_budget - sum(shares.values())
        weights = {w: (1.0 if math.isinf(values[w]) else values[w]) for w in self.word}
        total = sum(weights.values())
        if total <= 0:  # none has paid yet: an even split
            weights = dict.fromkeys(self.word, 1.0)
            total = float(len(self.word))
        given = 0
        for w in self.word:
            part = int(remaining * weights[w] / total)
            shares[w] += part
            given += part
        shares[max(self.word, key=weights.__getitem__)] += remaining - given
        return shares

    def record(self, name: str, cost: float, gain: float) -> None:
        self.arms[name].add(cost, gain)
        if self.run is not None:
            self.run.record(name, cost, gain)

    def end_round(self) -> None:
        self.rounds += 1
