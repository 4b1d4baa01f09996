"""Batched decoding for llama.cpp: many prompts in one context, one ``llama_decode`` per step.

llama-cpp-python's ``create_completion`` decodes one sequence at a time: each new token multiplies
the whole weight matrix by one vector, and a small model on a CPU is bound by reading those
weights. Here every live sequence of a ``generate`` call gets its own KV-cache sequence in one
context (the weights are shared with the ``Llama`` object, not loaded twice), and each step feeds
one token of every live sequence in a single batch: the weights are read once per step for all of
them. A sequence that finishes frees its slot and the next prompt is prefilled (in calls of its
own) and joins the next step (continuous batching).

Sampling is llama.cpp's own chain, as ``create_completion`` builds it (top-k 40, top-p, min-p
0.05, temperature, then a draw seeded by the request's seed; greedy at temperature 0), one chain
and one KV stream per sequence, and each prompt is prefilled in calls of its own. The same batch
gives the same replies; tests/test_llamacpp_batch.py also finds batch sizes 1 and 16, and mixed
batches, give identical replies on short prompts, and greedy replies equal ``create_completion``'s.
Not guaranteed in general: a decode step's matrix products see as many rows as live sequences,
and on long replies the rounding can differ enough to change a sampled token (measured: 8 items
of the throughput workload, ~160 tokens each, wrote different replies at batch sizes 1 and 8,
with the same mean score). vLLM makes the same trade. (A unified KV cache, where every
sequence's attention spans the others' masked cells, changed replies far more often.)
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_cpp._utils import suppress_stdout_stderr

from mils_pipeline.errors import GenerationError
from mils_pipeline.generate.base import Completion, SamplingParams

TOP_K = 40  # create_completion's defaults
MIN_P = 0.05
CELLS_STEP = 256  # KV streams grow in steps of this many tokens
BATCH_TOKENS = 512  # tokens fed per llama_decode call at most


@dataclass
class _Sequence:
    prompt: list[int]
    seed: int
    slot: int = -1
    sampler: Any = None
    tokens: list[int] = field(default_factory=list)
    text: bytes = b""
    finish_reason: str = ""


class BatchedDecoder:
    """Decodes up to ``max_sequences`` prompts at once; ``context_length`` bounds each one.

    Each sequence has a KV stream of its own (llama.cpp's non-unified cache), so its attention
    never spans another's cells: with the per-request sampler, a reply is the same whatever shares
    its batch and whatever the batch size. The streams are sized for the longest request seen so
    far (prompt plus token cap, in steps of ``CELLS_STEP``), not for the whole context window, so
    the cache holds what a round needs.
    """

    def __init__(self, llm: Any, max_sequences: int, context_length: int, threads: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._llm = llm
        self.max_sequences = max_sequences
        self.context_length = context_length
        self.threads = threads
        self._vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self._ctx: Any = None
        self._batch: Any = None
        self.cells_per_sequence = 0

    def _ensure(self, cells_per_sequence: int) -> None:
        """A context whose every sequence holds ``cells_per_sequence`` tokens (made anew only to grow)."""
        if self._ctx is not None and cells_per_sequence <= self.cells_per_sequence:
            return
        self.close()
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = cells_per_sequence * self.max_sequences
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = self.max_sequences
        params.kv_unified = False  # one KV stream per sequence
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        with suppress_stdout_stderr(disable=False):  # llama.cpp's own chatter, as the Llama object's
            self._ctx = lib.llama_init_from_model(self._llm._model.model, params)
        if not self._ctx:
            raise GenerationError(
                f"llama.cpp could not make a context for {self.max_sequences} sequences of "
                f"{cells_per_sequence} tokens; lower generator.batch_size or generator.context_length"
            )
        self._memory = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.cells_per_sequence = cells_per_sequence

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None
            self.cells_per_sequence = 0

    def tokenize(self, prompt: str) -> list[int]:
        return self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        sequences = [_Sequence(self.tokenize(p), s) for p, s in zip(prompts, seeds, strict=True)]
        if not sequences:
            return []
        longest = max(len(s.prompt) for s in sequences)
        if longest >= self.context_length:
            raise GenerationError(
                f"llama.cpp rejected a prompt: {longest} tokens do not fit the context of {self.context_length}. "
                "Raise generator.context_length or lower optimize.prompt_top_k / optimize.new_per_round"
            )
        need = min(-(-(longest + params.max_tokens + 1) // CELLS_STEP) * CELLS_STEP, self.context_length)
        self._ensure(max(need, CELLS_STEP))
        waiting = deque(sequences)
        free_slots = list(range(self.max_sequences - 1, -1, -1))
        self._lib.llama_memory_clear(self._memory, False)
        # (sequence, token, position, wants logits) to feed at the next decode
        feed: list[tuple[_Sequence, int, int, bool]] = []

        def release(finished: list[_Sequence]) -> None:
            for sequence in finished:
                self._lib.llama_memory_seq_rm(self._memory, sequence.slot, -1, -1)
                free_slots.append(sequence.slot)

        try:
            while True:
                while waiting and free_slots:
                    sequence = waiting.popleft()
                    sequence.slot = free_slots.pop()
                    sequence.sampler = self._sampler(params, sequence.seed)
                    # a prompt is prefilled in decode calls of its own, chunked the same way
                    # whatever else is live: its KV values do not depend on the batch
                    last = len(sequence.prompt) - 1
                    entries = [(sequence, t, p, p == last) for p, t in enumerate(sequence.prompt)]
                    for start in range(0, len(entries), BATCH_TOKENS):
                        release(self._decode(entries[start : start + BATCH_TOKENS], params))
                    if not sequence.finish_reason:
                        feed.append((sequence, sequence.tokens[-1], last + 1, True))
                if not feed:
                    break
                # one step: the next token of every live sequence
                chunk, feed = feed[:BATCH_TOKENS], feed[BATCH_TOKENS:]
                release(self._decode(chunk, params))
                for sequence, _, position, _ in chunk:
                    if not sequence.finish_reason:
                        feed.append((sequence, sequence.tokens[-1], position + 1, True))
        finally:
            for sequence in sequences:
                if sequence.sampler is not None:
                    self._lib.llama_sampler_free(sequence.sampler)
                    sequence.sampler = None
        return [self._completion(s) for s in sequences]

    def _decode(self, chunk: list[tuple[_Sequence, int, int, bool]], params: SamplingParams) -> list[_Sequence]:
        """Feed ``chunk`` in one ``llama_decode``; sample a token for every entry that wants
        logits; returns the sequences that finished."""
        batch = self._batch
        batch.n_tokens = len(chunk)
        for i, (sequence, token, position, wants) in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = sequence.slot
            batch.logits[i] = wants
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise GenerationError(
                f"llama.cpp could not decode a batch (status {status}: no room in the KV cache); lower "
                "generator.batch_size or raise generator.context_length"
            )
        finished = []
        for i, (sequence, _, position, wants) in enumerate(chunk):
            if not wants:
                continue
            token = self._lib.llama_sampler_sample(sequence.sampler, self._ctx, i)
            if self._lib.llama_vocab_is_eog(self._vocab, token):
                sequence.finish_reason = "stop"
            else:
                sequence.tokens.append(token)
                sequence.text += self._llm.detokenize([token], special=False)
                if self._stopped(sequence, params.stop):
                    sequence.finish_reason = "stop"
                elif len(sequence.tokens) >= params.max_tokens or position + 2 >= self.cells_per_sequence:
                    sequence.finish_reason = "length"
            if sequence.finish_reason:
                finished.append(sequence)
        return finished

    @staticmethod
    def _stopped(sequence: _Sequence, stops: Sequence[str]) -> bool:
        if not stops:
            return False
        text = sequence.text.decode("utf-8", errors="ignore")
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut < 0:
            return False
        sequence.text = text[:cut].encode("utf-8")
        return True

    def _sampler(self, params: SamplingParams, seed: int) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(TOP_K))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(MIN_P, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(ctypes.c_uint32(seed & 0xFFFFFFFF)))
        return chain

    @staticmethod
    def _completion(sequence: _Sequence) -> Completion:
        return Completion(
            text=sequence.text.decode("utf-8", errors="ignore"),
            prompt_tokens=len(sequence.prompt),
            completion_tokens=len(sequence.tokens),
            finish_reason=sequence.finish_reason or "length",
        )
