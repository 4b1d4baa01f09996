"""The batched MILS loop: pure logic over a Generator and a cached text encoder.

Per round, one generate call carries the prompts of every active item that its allocator sends to
the LLM, the word operators add their proposals (mils_pipeline/operators.py), and one encode call
scores all the new texts; the word operators then take ``word_steps - 1`` more steps from the
improved kept captions, one encode call per step. Items join and leave the batch independently (item-level continuous
batching): an item that stops is yielded at once and a waiting one takes its place. Rejections
(samples that could not be decoded, upstream) pass through in order; an item whose media
embedding is unusable leaves as a rejection too. Every candidate records the operator that made
it, every round its cost in GPU-seconds-equivalent (mils_pipeline/costs.py).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mils_pipeline.config import RunConfig
from mils_pipeline.costs import cost_model
from mils_pipeline.generate.base import CandidateList, Generator, SamplingParams
from mils_pipeline.generate.parsing import parse_candidates
from mils_pipeline.generate.prompts import (
    PromptTemplate,
    max_tokens_for,
    refine_prefix,
    refine_prompt,
    refine_stop,
)
from mils_pipeline.operators import (
    WORD_OPERATORS,
    Allocator,
    ItemContexts,
    RoundPlan,
    RunPrior,
    WordContexts,
    word_proposals,
)
from mils_pipeline.score.cache import CachedTextEncoder, EncoderStats
from mils_pipeline.score.objective import Component, ItemMedia, Objective
from mils_pipeline.seeding import SeedPool, top_k_seeds
from mils_pipeline.text import normalise_text

STOP_MAX_ROUNDS = "max_rounds"
STOP_CONVERGED = "converged"
STOP_BUDGET = "budget"


@dataclass
class ItemInput:
    """One decoded media item waiting to be captioned; ``meta`` rides along to the output row."""

    key: str
    media: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """A sample that cannot be captioned, and why: it becomes a quarantine row."""

    key: str
    member: str
    error_type: str
    message: str
    seconds_read: float = 0.0
    seconds_decode: float = 0.0


@dataclass(frozen=True)
class ComponentScore:
    """One scorer's score of a candidate in a combined objective (None: the sample lacks its media)."""

    name: str
    score: float | None


@dataclass(frozen=True)
class Candidate:
    text: str
    score: float  # the objective's score: the combined one when several scorers rate the sample
    round: int
    components: tuple[ComponentScore, ...] = ()
    operator: str = "seed"  # what proposed it: seed, rewrite, edit, mutate, crossover
    truncated: bool = False  # longer than a scorer's text context: scored on its first tokens only


@dataclass(frozen=True)
class RoundRecord:
    round: int
    best_score: float
    mean_top_k: float
    new_candidates: int
    gpu_seconds: float = 0.0  # what the round cost, in GPU-seconds-equivalent (mils_pipeline/costs.py)
    truncated: int = 0  # of new_candidates, those longer than a scorer's text context (scored on a prefix)


@dataclass
class ItemResult:
    key: str
    meta: dict[str, Any]
    candidates: list[Candidate]  # final top K, best first
    trajectory: list[RoundRecord]
    stop_reason: str
    prompt_tokens: int
    completion_tokens: int
    empty_replies: int
    texts_scored: int
    texts_encoded: int = 0  # of texts_scored: those the scorer's text tower ran on for this item
    media_encoded: int = 1
    gpu_seconds: float = 0.0  # the item's cost in GPU-seconds-equivalent (mils_pipeline/costs.py)

    @property
    def texts_cached(self) -> int:
        """Texts scored from the seed pool's stored embeddings or the text cache, not encoded."""
        return self.texts_scored - self.texts_encoded

    @property
    def caption(self) -> str:
        return self.candidates[0].text

    @property
    def score(self) -> float:
        return self.candidates[0].score

    @property
    def rounds(self) -> int:
        return self.trajectory[-1].round


@dataclass(frozen=True)
class RoundEvent:
    """One item after one round (0: the seeds), for whoever watches the loop (``on_round``)."""

    key: str
    round: int
    top: list[Candidate]  # the kept candidates after this round, best first


@dataclass
class LoopStats:
    """Counters and timings of one ``MilsOptimizer.run``: the loop's part of a shard's cost."""

    items: int = 0
    rounds: int = 0
    generate_calls: int = 0
    prompts: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens the engine's prefix cache served (vLLM, servers that say)
    completion_tokens: int = 0
    empty_replies: int = 0
    media_encoded: int = 0
    gpu_seconds: float = 0.0  # everything above, priced with mils_pipeline/costs.py
    # new candidates scored, and final captions, longer than a scorer's text context: their score is
    # the score of their first tokens (the card warns when the share is not small)
    texts_truncated: int = 0
    captions_truncated: int = 0
    # completion tokens that went into an accepted new candidate (counted by a backend's list guard,
    # else estimated by the share of the reply's characters in its accepted lines), and both counts
    # per round ("1", "2", ...)
    useful_completion_tokens: float = 0.0
    completion_tokens_by_round: dict[str, int] = field(default_factory=dict)
    useful_tokens_by_round: dict[str, float] = field(default_factory=dict)
    proposals: dict[str, int] = field(default_factory=dict)  # new candidates scored, by operator
    improvements: dict[str, int] = field(default_factory=dict)  # rounds an operator raised an item's best
    seconds_generate: float = 0.0
    seconds_score: float = 0.0
    seconds_media: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class _Active:
    input: ItemInput
    media: ItemMedia
    top: list[Candidate]  # the kept candidates, best first: K, or more for the word operators' parents
    seen: set[str]
    trajectory: list[RoundRecord]
    allocator: Allocator
    contexts: ItemContexts
    generated: list[str] = field(default_factory=list)
    round: int = 0
    llm_rounds: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    empty_replies: int = 0
    texts_encoded: int = 0
    gpu_seconds: float = 0.0


def request_seed(run_seed: int, key: str, round_: int) -> int:
    """Sampling seed of one request: a function of the run seed, the item and the round only, so
    results do not depend on batch composition or order."""
    digest = hashlib.sha256(f"{run_seed}\x00{key}\x00{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _record(round_: int, top: list[Candidate], new: int, gpu_seconds: float = 0.0, truncated: int = 0) -> RoundRecord:
    scores = [c.score for c in top]
    return RoundRecord(round_, scores[0], float(np.mean(scores)), new, round(gpu_seconds, 6), truncated)


def _components(names: Sequence[str], scores: np.ndarray) -> tuple[ComponentScore, ...]:
    return tuple(ComponentScore(n, float(s) if np.isfinite(s) else None) for n, s in zip(names, scores, strict=True))


def merge_top_k(top: list[Candidate], new: list[Candidate], k: int) -> list[Candidate]:
    """Best ``k`` of both lists, best first; on equal scores the older candidate stays ahead."""
    merged = sorted([*top, *new], key=lambda c: (-c.score, c.round))
    return merged[:k]


class MilsOptimizer:
    def __init__(
        self,
        generator: Generator,
        encoder: CachedTextEncoder,
        seed_pool: SeedPool,
        seed_embeddings: np.ndarray,
        config: RunConfig,
        extra_components: Sequence[Component] = (),
    ) -> None:
        """``encoder`` and ``seed_embeddings`` belong to the main scorer; ``extra_components`` are
        further scorers combined with it by weight (see score/objective.py)."""
        self.generator = generator
        self.encoder = encoder
        self.scorer = encoder.scorer
        self.pool = seed_pool
        self.pool_embeddings = seed_embeddings
        self.config = config
        self.opt = config.optimize
        self.template = PromptTemplate.for_modality(config.generator.prompt_style, config.modality)
        self.prices = cost_model(config.modality)
        # word contexts of the seed pool, built once; each item adds its own candidates' contexts
        uses_words = any(o in WORD_OPERATORS for o in self.opt.operators)
        self.pool_contexts = WordContexts(seed_pool.texts if uses_words else ())
        # candidates kept per item while it is refined: the word operators' parents can be more than K
        self.keep = max(self.opt.top_k, self.opt.word_parents or 0) if uses_words else self.opt.top_k
        self.stats = LoopStats()
        self._on_round: Callable[[RoundEvent], None] | None = None
        self._prior: RunPrior | None = None
        main = Component(config.modality, config.scorer.weight, encoder, seed_embeddings)
        self.objective = Objective([main, *extra_components])
        for component in self.objective.components:
            component.encoder.pin(seed_pool.keys, component.pool_embeddings)

    @property
    def _guarded(self) -> bool:
        """A backend with a list guard stops each reply at N new captions and takes known= per prompt."""
        return bool(getattr(self.generator, "guards_lists", False))

    @property
    def prompt_sha256(self) -> str:
        return self.template.sha256()

    def run(
        self, items: Iterable[ItemInput | Rejection], on_round: Callable[[RoundEvent], None] | None = None
    ) -> Iterator[ItemResult | Rejection]:
        """Caption every item; results come out as items finish, rejections as they arrive.

        ``stats`` (and each scorer's text-encoder ``stats``) count this call alone: a shard's cost
        is what its run spent. ``on_round`` sees every item after its seeds and after each round.
        """
        self.stats = LoopStats()
        for component in self.objective.components:
            component.encoder.stats = EncoderStats()
        self._on_round = on_round
        # what the operators bought for this call's earlier items: later items start from it
        self._prior = RunPrior() if self.opt.share_operator_record else None
        pending = iter(items)
        active: list[_Active] = []
        exhausted = False
        while True:
            joiners: list[ItemInput] = []
            while not exhausted and len(active) + len(joiners) < self.opt.max_active_items:
                element = next(pending, None)
                if element is None:
                    exhausted = True
                elif isinstance(element, Rejection):
                    yield element
                else:
                    joiners.append(element)
            if joiners:
                states, failures = self._start(joiners)
                yield from failures
                for state in states:
                    if self.opt.max_rounds == 0:
                        yield self._finish(state, STOP_MAX_ROUNDS)
                    else:
                        active.append(state)
            if not active:
                if not joiners:
                    return  # input used up and nothing left to refine
                continue
            self._round(active)
            still: list[_Active] = []
            for state in active:
                reason = self._stop_reason(state)
                if reason is None:
                    still.append(state)
                else:
                    yield self._finish(state, reason)
            active = still

    def _watch(self, state: _Active) -> None:
        if self._on_round is not None:
            self._on_round(RoundEvent(state.input.key, state.round, state.top[: self.opt.top_k]))

    def _start(self, joiners: list[ItemInput]) -> tuple[list[_Active], list[Rejection]]:
        started = time.perf_counter()
        media = self.objective.embed_media([item.media for item in joiners])
        self.stats.media_encoded += len(joiners)
        self.stats.gpu_seconds += self.prices.media_encode * len(joiners)
        self.stats.seconds_media += time.perf_counter() - started
        usable = [all(e is None or bool(np.isfinite(e).all()) for e in item.embeddings) for item in media]
        failures = [
            Rejection(
                item.key,
                item.meta.get("member", item.key),
                "non_finite_embedding",
                "the scorer returned a non-finite (NaN or inf) media embedding",
            )
            for item, ok in zip(joiners, usable, strict=True)
            if not ok
        ]
        if failures:
            self.stats.rejected["non_finite_embedding"] = self.stats.rejected.get("non_finite_embedding", 0) + len(
                failures
            )
            joiners = [item for item, ok in zip(joiners, usable, strict=True) if ok]
            media = [item for item, ok in zip(media, usable, strict=True) if ok]
        if not joiners:
            return [], failures
        started = time.perf_counter()
        queries = np.stack([self.objective.query(m) for m in media])
        indices, scores = top_k_seeds(self.objective.pool_embeddings, queries, self.keep)
        self.stats.seconds_score += time.perf_counter() - started
        states = []
        for item, item_media, idx_row, score_row in zip(joiners, media, indices, scores, strict=True):
            parts = self.objective.pool_components(idx_row, item_media)
            cut = self.objective.truncated([self.pool.texts[i] for i in idx_row])
            top = [
                Candidate(self.pool.texts[i], float(s), 0, _components(self.objective.names, p), truncated=bool(c))
                for i, s, p, c in zip(idx_row, score_row, parts, cut, strict=True)
            ]
            shown = top[: self.opt.top_k]
            state = _Active(
                input=item,
                media=item_media,
                top=top,
                seen={normalise_text(c.text) for c in top},
                trajectory=[_record(0, shown, len(shown), self.prices.media_encode, sum(c.truncated for c in shown))],
                allocator=Allocator(self.opt.operators, self.opt.word_proposals, prior=self._prior),
                contexts=ItemContexts(self.pool_contexts),
                gpu_seconds=self.prices.media_encode,
            )
            self._watch(state)
            states.append(state)
        return states, failures

    def _sampling(self, mode: str) -> SamplingParams:
        cap = self.config.generator.max_tokens or max_tokens_for(self.opt.new_per_round, self.opt.max_caption_words)
        return SamplingParams(
            temperature=self.config.generator.temperature,
            top_p=self.config.generator.top_p,
            max_tokens=cap,
            stop=refine_stop(self.template, self.opt.new_per_round, mode, guarded=self._guarded),
            shared_prefix=refine_prefix(
                self.template, self.opt.new_per_round, self.opt.max_caption_words, self.config.modality
            ),
            candidate_list=CandidateList(
                self.opt.new_per_round,
                self.opt.max_caption_words,
                patience=self.opt.reply_patience,
                refuse_known=self.opt.refuse_repeats,
            ),
        )

    def _llm_proposals(self, active: list[_Active], plans: list[RoundPlan]) -> list[list[str]]:
        """The LLM operators' new texts per item (empty for items the allocator kept off the LLM).
        Items can be at different rounds and operators (continuous batching): one generate call
        per prompt kind keeps each call's sampling parameters exact."""
        shown = min(self.opt.prompt_top_k or self.opt.top_k, self.opt.top_k)
        by_mode: dict[str, list[int]] = {}
        for index, plan in enumerate(plans):
            if plan.llm is not None:
                by_mode.setdefault(plan.llm, []).append(index)
        out: list[list[str]] = [[] for _ in active]
        for mode, indices in by_mode.items():
            prompts = [
                refine_prompt(
                    self.template,
                    [(c.text, c.score) for c in active[i].top[:shown]],
                    self.opt.new_per_round,
                    self.opt.max_caption_words,
                    self.config.modality,
                    mode,
                )
                for i in indices
            ]
            seeds = [request_seed(self.opt.seed, active[i].input.key, active[i].round) for i in indices]
            started = time.perf_counter()
            if self._guarded:  # the backend's list guard: no line may end on a caption the item has seen
                known = [active[i].seen for i in indices]
                replies = self.generator.generate(prompts, self._sampling(mode), seeds, known=known)
            else:
                replies = self.generator.generate(prompts, self._sampling(mode), seeds)
            self.stats.generate_calls += 1
            self.stats.prompts += len(indices)
            self.stats.seconds_generate += time.perf_counter() - started
            for i, completion in zip(indices, replies, strict=True):
                state = active[i]
                state.llm_rounds += 1
                state.prompt_tokens += completion.prompt_tokens
                state.completion_tokens += completion.completion_tokens
                self.stats.prompt_tokens += completion.prompt_tokens
                self.stats.cached_prompt_tokens += completion.cached_prompt_tokens
                self.stats.completion_tokens += completion.completion_tokens
                plans[i].llm_cost = self.prices.gpu_seconds(completion.completion_tokens, completion.prompt_tokens)
                parsed = parse_candidates(
                    completion.text,
                    self.opt.max_caption_words,
                    exclude=state.seen,
                    cut_off=completion.finish_reason == "length",
                )
                for reason, count in parsed.rejected.items():
                    self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + count
                if parsed.empty:
                    state.empty_replies += 1
                    self.stats.empty_replies += 1
                texts = parsed.candidates[: self.opt.new_per_round]
                if completion.useful_tokens is not None:  # counted by the backend's list guard
                    useful = float(completion.useful_tokens)
                else:
                    useful = completion.completion_tokens * parsed.useful_share(self.opt.new_per_round)
                round_key, stats = str(state.round), self.stats
                stats.useful_completion_tokens += useful
                stats.useful_tokens_by_round[round_key] = stats.useful_tokens_by_round.get(round_key, 0) + useful
                stats.completion_tokens_by_round[round_key] = (
                    stats.completion_tokens_by_round.get(round_key, 0) + completion.completion_tokens
                )
                state.seen.update(normalise_text(t) for t in texts)
                state.contexts.add(texts)  # the LLM's words and contexts become the word operators' too
                out[i] = texts
        return out

    def _word_proposals(self, state: _Active, plan: RoundPlan, rng: random.Random) -> list[tuple[str, str]]:
        """(operator, text) from the word operators, parents the item's current kept captions."""
        parents = [c.text for c in state.top]
        out: list[tuple[str, str]] = []
        for operator, count in plan.words.items():
            texts = word_proposals(
                operator,
                parents,
                state.contexts,
                count,
                self.opt.max_caption_words,
                state.seen,
                rng,
                similarity=self.opt.mutate_similarity,
            )
            out.extend((operator, t) for t in texts)
        return out

    def _round(self, active: list[_Active]) -> None:
        """One round: the LLM's proposals (for the items the allocator sends to it) and the first
        word step are scored together; then ``word_steps - 1`` more word steps, each proposing from
        the kept captions the previous step left (a hill climb that costs text encodes only)."""
        plans = [state.allocator.plan(state.llm_rounds) for state in active]
        for state in active:
            state.round += 1
        llm_texts = self._llm_proposals(active, plans)
        rngs = [random.Random(request_seed(self.opt.seed, s.input.key, s.round)) for s in active]
        best_before = [state.top[0].score for state in active]
        new: list[list[Candidate]] = [[] for _ in active]
        encodes: list[dict[str, int]] = [{} for _ in active]  # per item: text encodes by operator
        started = time.perf_counter()
        for step in range(self.opt.word_steps):
            proposals: list[list[tuple[str, str]]] = []
            for i, (state, plan) in enumerate(zip(active, plans, strict=True)):
                items = [(plan.llm or "", t) for t in llm_texts[i]] if step == 0 else []
                items += self._word_proposals(state, plan, rngs[i])
                state.generated.extend(t for _, t in items)
                proposals.append(items)
            if not any(proposals):
                break  # the word operators found nothing new for any item
            self._score_step(active, proposals, new, encodes)
        for i, (state, plan) in enumerate(zip(active, plans, strict=True)):
            round_cost = self._credit(state, plan, new[i], encodes[i], best_before[i])
            state.gpu_seconds += round_cost
            truncated = sum(c.truncated for c in new[i])
            state.trajectory.append(
                _record(state.round, state.top[: self.opt.top_k], len(new[i]), round_cost, truncated)
            )
            self._watch(state)
        self.stats.seconds_score += time.perf_counter() - started
        self.stats.rounds += 1

    def _score_step(
        self,
        active: list[_Active],
        proposals: list[list[tuple[str, str]]],
        new: list[list[Candidate]],
        encodes: list[dict[str, int]],
    ) -> None:
        """Score every item's proposals in one encode call and merge them into its kept captions."""
        flat = [t for items in proposals for _, t in items]
        embeddings, fresh = self.objective.encode_with_origin(flat)
        cut = self.objective.truncated(flat)
        self.stats.texts_truncated += int(cut.sum())
        offset = 0
        for i, (state, items) in enumerate(zip(active, proposals, strict=True)):
            if not items:
                continue
            rows = slice(offset, offset + len(items))
            offset += len(items)
            scores, parts = self.objective.score(embeddings, rows, state.media)
            fresh_rows, cut_rows = fresh[rows], cut[rows]
            state.texts_encoded += int(fresh_rows.sum())
            finite = np.isfinite(scores)
            if not finite.all():  # a broken scorer output must not enter the top K
                self.stats.rejected["non_finite_score"] = self.stats.rejected.get("non_finite_score", 0) + int(
                    (~finite).sum()
                )
            step_new: list[Candidate] = []
            for (operator, text), score, part, ok, was_encoded, was_cut in zip(
                items, scores, parts, finite, fresh_rows, cut_rows, strict=True
            ):
                encodes[i][operator] = encodes[i].get(operator, 0) + int(was_encoded)
                self.stats.proposals[operator] = self.stats.proposals.get(operator, 0) + 1
                if ok:
                    components = _components(self.objective.names, part)
                    step_new.append(Candidate(text, float(score), state.round, components, operator, bool(was_cut)))
            new[i].extend(step_new)
            state.top = merge_top_k(state.top, step_new, self.keep)

    def _credit(
        self, state: _Active, plan: RoundPlan, new: list[Candidate], encodes: dict[str, int], best_before: float
    ) -> float:
        """Tell the item's bandit what each operator cost and how far it raised the best score;
        returns the round's cost in GPU-seconds."""
        total = 0.0
        operators = ([plan.llm] if plan.llm else []) + [o for o, n in plan.words.items() if n > 0]
        for operator in operators:
            cost = self.prices.gpu_seconds(text_encodes=encodes.get(operator, 0))
            if operator == plan.llm:
                cost += plan.llm_cost
            best = max((c.score for c in new if c.operator == operator), default=best_before)
            gain = max(0.0, best - best_before)
            if gain > 0:
                self.stats.improvements[operator] = self.stats.improvements.get(operator, 0) + 1
            state.allocator.record(operator, cost, gain)
            total += cost
        state.allocator.end_round()
        self.stats.gpu_seconds += total
        return total

    def _stop_reason(self, state: _Active) -> str | None:
        if state.round >= self.opt.max_rounds:
            return STOP_MAX_ROUNDS
        budget = self.opt.max_tokens_per_item
        if budget is not None and state.completion_tokens >= budget:
            return STOP_BUDGET
        patience = self.opt.convergence_patience
        if self.opt.convergence_epsilon > 0 and state.round >= patience:
            gain = state.trajectory[-1].best_score - state.trajectory[-1 - patience].best_score
            if gain < self.opt.convergence_epsilon:
                return STOP_CONVERGED
        return None

    def _finish(self, state: _Active, reason: str) -> ItemResult:
        self.objective.release(state.generated)
        self.stats.items += 1
        self.stats.captions_truncated += int(state.top[0].truncated)
        return ItemResult(
            key=state.input.key,
            meta=state.input.meta,
            candidates=state.top[: self.opt.top_k],
            trajectory=state.trajectory,
            stop_reason=reason,
            prompt_tokens=state.prompt_tokens,
            completion_tokens=state.completion_tokens,
            empty_replies=state.empty_replies,
            texts_scored=len(state.generated),
            texts_encoded=state.texts_encoded,
            gpu_seconds=round(state.gpu_seconds, 6),
        )
