"""The reference code's structure, on this project's generator and scorer: the baseline of
`throughput.py --naive`.

What the published MILS code does per item, and this loop does too (facebookresearch/MILS,
main_image_captioning.py and optimization_utils/): every item scores the whole seed pool by
embedding all its texts again; every round re-scores the kept top K together with the new texts
(no text cache); a request may run to 3,000 new tokens and ends only at the model's end of text
(no stop rule from N and the caption length); items go through the loop one at a time. The
prompt, the parser and the sampling are this project's, so the comparison measures the structure
and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from mils_pipeline.config import RunConfig
from mils_pipeline.generate.base import Generator, SamplingParams
from mils_pipeline.generate.parsing import parse_candidates
from mils_pipeline.generate.prompts import PromptTemplate, refine_prompt
from mils_pipeline.optimize import ItemInput, request_seed
from mils_pipeline.score.base import Scorer
from mils_pipeline.text import normalise_text

REFERENCE_MAX_TOKENS = 3000  # max_new_tokens of the reference Generator


@dataclass
class NaiveStats:
    items: int = 0
    generate_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    useful_completion_tokens: float = 0.0
    texts_encoded: int = 0
    media_encoded: int = 0
    seconds_generate: float = 0.0
    seconds_score: float = 0.0
    seconds_media: float = 0.0
    per_item_seconds: list[float] = field(default_factory=list)


@dataclass
class NaiveResult:
    key: str
    caption: str
    score: float
    rounds: int


class NaiveReferenceLoop:
    def __init__(
        self,
        generator: Generator,
        scorer: Scorer,
        pool_texts: list[str],
        config: RunConfig,
        max_tokens: int = REFERENCE_MAX_TOKENS,
    ) -> None:
        self.generator = generator
        self.scorer = scorer
        self.pool_texts = pool_texts
        self.config = config
        self.opt = config.optimize
        self.batch_size = config.scorer.text_batch_size
        self.template = PromptTemplate(style=config.generator.prompt_style)
        # the reference stops a request only at the model's end of text, or at the cap
        self.sampling = SamplingParams(
            temperature=config.generator.temperature, top_p=config.generator.top_p, max_tokens=max_tokens, stop=()
        )
        self.stats = NaiveStats()

    def _score(self, texts: list[str], media: np.ndarray) -> np.ndarray:
        """Every text through the text tower, in batches, as the reference's scorer does."""
        started = time.perf_counter()
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = [normalise_text(t) for t in texts[start : start + self.batch_size]]
            scores.append(self.scorer.embed_texts(batch) @ media)
        self.stats.texts_encoded += len(texts)
        self.stats.seconds_score += time.perf_counter() - started
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    def _top_k(self, texts: list[str], scores: np.ndarray) -> list[tuple[str, float]]:
        order = np.argsort(-scores, kind="stable")[: self.opt.top_k]
        return [(texts[i], float(scores[i])) for i in order]

    def caption(self, item: ItemInput) -> NaiveResult:
        return self.caption_group([item])[0]

    def caption_group(self, items: list[ItemInput]) -> list[NaiveResult]:
        """Items in lockstep: each round sends their prompts in one generate call (the reference
        engine batches them); with one item, the reference loop as published."""
        group_started = time.perf_counter()
        started = time.perf_counter()
        media = self.scorer.embed_media([item.media for item in items])
        self.stats.media_encoded += len(items)
        self.stats.seconds_media += time.perf_counter() - started

        tops = [self._top_k(self.pool_texts, self._score(self.pool_texts, m)) for m in media]
        shown = min(self.opt.prompt_top_k or self.opt.top_k, self.opt.top_k)
        for round_ in range(1, self.opt.max_rounds + 1):
            prompts = [
                refine_prompt(
                    self.template, top[:shown], self.opt.new_per_round, self.opt.max_caption_words, self.config.modality
                )
                for top in tops
            ]
            seeds = [request_seed(self.opt.seed, item.key, round_) for item in items]
            started = time.perf_counter()
            completions = self.generator.generate(prompts, self.sampling, seeds)
            self.stats.seconds_generate += time.perf_counter() - started
            self.stats.generate_calls += 1
            for i, completion in enumerate(completions):
                self.stats.prompt_tokens += completion.prompt_tokens
                self.stats.completion_tokens += completion.completion_tokens
                kept = [text for text, _ in tops[i]]
                parsed = parse_candidates(
                    completion.text,
                    self.opt.max_caption_words,
                    exclude={normalise_text(t) for t in kept},
                    cut_off=completion.finish_reason == "length",
                )
                # the reference keeps every parsed line; its useful share counts them all
                self.stats.useful_completion_tokens += completion.completion_tokens * parsed.useful_share(
                    len(parsed.candidates)
                )
                # new texts and the kept ones, all scored again
                candidates = [*parsed.candidates, *kept]
                tops[i] = self._top_k(candidates, self._score(candidates, media[i]))
        self.stats.items += len(items)
        seconds = time.perf_counter() - group_started
        self.stats.per_item_seconds.extend([seconds / len(items)] * len(items))
        return [
            NaiveResult(key=item.key, caption=top[0][0], score=top[0][1], rounds=self.opt.max_rounds)
            for item, top in zip(items, tops, strict=True)
        ]

    def run(self, items: Iterable[ItemInput], items_per_call: int = 1) -> Iterator[NaiveResult]:
        group: list[ItemInput] = []
        for item in items:
            group.append(item)
            if len(group) == items_per_call:
                yield from self.caption_group(group)
                group = []
        if group:
            yield from self.caption_group(group)
