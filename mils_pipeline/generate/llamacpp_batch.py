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

The shared prefix (``params.shared_prefix``, a refine prompt's instructions): evaluated once into
a KV stream of its own and copied into each sequence's stream before its own tokens are
prefilled; it stays there across calls while the prefix stays the same. A reply still depends on
(prompt, seed, prefix) only.

The list guard (``known=`` with ``params.candidate_list``): a refine reply is a list of captions,
and a small model spends most of its tokens writing again the captions it was shown, or its own
earlier lines. While a reply streams, every finished line goes through the reply parser
(``parsing.parse_line``): a line that would end on a caption already known (shown, seen earlier
for the item, or earlier in the reply) may not end there. Its line-ending tokens (any token with a
newline, and end of text) are masked out of the logits and the token is drawn again from the same
sampler, so the model has to write on into a new caption (``refuse_known``); once the line is as
long as a caption may be, it may end. The reply stops as soon as it holds ``n`` new captions, or
after ``patience`` lines in a row without one: a small model that starts repeating itself rarely
stops. The tokens of the accepted lines are counted (``Completion.useful_tokens``).
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from llama_cpp._utils import suppress_stdout_stderr

from mils_pipeline.errors import GenerationError
from mils_pipeline.generate.base import CandidateList, Completion, SamplingParams
from mils_pipeline.generate.parsing import parse_line
from mils_pipeline.text import normalise_text, word_count

TOP_K = 40  # create_completion's defaults
MIN_P = 0.05
CELLS_STEP = 256  # KV streams grow in steps of this many tokens
BATCH_TOKENS = 512  # tokens fed per llama_decode call at most


@dataclass
class ListGuard:
    """One reply's list guard: what it may not repeat, and what it has accepted so far."""

    shape: CandidateList
    known: set[str]
    line: bytes = b""  # the unfinished line
    idle_lines: int = 0
    line_tokens: int = 0
    accepted: int = 0
    useful_tokens: int = 0

    def _key(self, line: bytes) -> tuple[str | None, int]:
        """The caption's normal form in a reply line (None when it holds none) and its word count."""
        text, _ = parse_line(line.decode("utf-8", errors="ignore"), self.shape.max_words)
        return (None, 0) if text is None else (normalise_text(text), word_count(text))

    def verdict(self, line: bytes) -> str:
        """``new``, ``repeat`` (may not end here), or ``other`` (blank, junk, too long, preamble)."""
        key, words = self._key(line)
        if key is None:
            return "other"
        if key not in self.known:
            return "new"
        # at the caption length limit a line may end, whatever it holds (the parser rejects it)
        return "repeat" if words < self.shape.max_words else "other"

    def close_line(self, line: bytes, tokens: int) -> bool:
        """Account for a finished line; True when the reply is done: it holds its ``n`` new
        captions, or ``patience`` lines in a row held none."""
        key, _ = self._key(line)
        if key is not None and key not in self.known:
            self.known.add(key)
            self.accepted += 1
            self.useful_tokens += tokens
            self.idle_lines = 0
        elif key is not None or line.strip():  # a repeat, junk, too long: not a blank line
            self.idle_lines += 1
        return self.accepted >= self.shape.n or (0 < self.shape.patience <= self.idle_lines)


@dataclass
class _Sequence:
    prompt: list[int]
    seed: int
    slot: int = -1
    sampler: Any = None
    tokens: list[int] = field(default_factory=list)
    text: bytes = b""
    finish_reason: str = ""
    guard: ListGuard | None = None
    cached: int = 0  # prompt tokens copied from the prefix stream


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
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._line_ends: np.ndarray | None = None  # token ids that end a line (newline or end of text)
        self._ctx: Any = None
        self._batch: Any = None
        self.cells_per_sequence = 0
        # the shared prompt prefix (SamplingParams.shared_prefix) lives in a stream of its own, the
        # last one; each sequence starts from a copy of it
        self.prefix_slot = max_sequences
        self._prefix: list[int] = []

    def _ensure(self, cells_per_sequence: int) -> None:
        """A context whose every sequence holds ``cells_per_sequence`` tokens (made anew only to grow)."""
        if self._ctx is not None and cells_per_sequence <= self.cells_per_sequence:
            return
        self.close()
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = cells_per_sequence * (self.max_sequences + 1)
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = self.max_sequences + 1  # and the prefix stream
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
        self._prefix = []

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None
            self.cells_per_sequence = 0

    def tokenize(self, prompt: str) -> list[int]:
        return self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def line_end_tokens(self) -> np.ndarray:
        """Every token whose text holds a newline, and every end-of-generation token."""
        if self._line_ends is None:
            lib = self._lib
            ends = [
                t
                for t in range(self._n_vocab)
                if lib.llama_vocab_is_eog(self._vocab, t) or b"\n" in self._llm.detokenize([t], special=False)
            ]
            self._line_ends = np.asarray(ends, dtype=np.int64)
        return self._line_ends

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        seeds: Sequence[int],
        known: Sequence[Collection[str]] | None = None,
    ) -> list[Completion]:
        """``known`` (with ``params.candidate_list``) turns on the list guard, per prompt."""
        sequences = [_Sequence(self.tokenize(p), s) for p, s in zip(prompts, seeds, strict=True)]
        if not sequences:
            return []
        if known is not None and params.candidate_list is not None:
            if len(known) != len(sequences):
                raise ValueError("generate needs one known set per prompt")
            for sequence, texts in zip(sequences, known, strict=True):
                sequence.guard = ListGuard(params.candidate_list, set(texts))
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
        for slot in free_slots:  # what an interrupted call left; the prefix stream stays
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
        shared = self._shared_prefix(params, sequences)
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
                    # whatever else is live: its KV values do not depend on the batch. The shared
                    # prefix is a copy of the prefix stream, which was prefilled on its own
                    last = len(sequence.prompt) - 1
                    if shared:
                        self._lib.llama_memory_seq_cp(self._memory, self.prefix_slot, sequence.slot, -1, -1)
                        sequence.cached = shared
                    entries = [(sequence, t, p, p == last) for p, t in enumerate(sequence.prompt) if p >= shared]
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

    def _shared_prefix(self, params: SamplingParams, sequences: list[_Sequence]) -> int:
        """Tokens of ``params.shared_prefix`` held in the prefix stream (prefilled once, kept across
        calls while the prefix stays the same); 0 when some prompt does not start with them."""
        if not params.shared_prefix:
            return 0
        tokens = self.tokenize(params.shared_prefix)
        if len(tokens) < 2 or any(len(s.prompt) <= len(tokens) or s.prompt[: len(tokens)] != tokens for s in sequences):
            return 0  # (a prompt that tokenizes differently at the seam is prefilled whole)
        if tokens != self._prefix:
            self._lib.llama_memory_seq_rm(self._memory, self.prefix_slot, -1, -1)
            self._prefix = []
            holder = _Sequence(tokens, 0, slot=self.prefix_slot)
            entries = [(holder, t, p, False) for p, t in enumerate(tokens)]
            for start in range(0, len(entries), BATCH_TOKENS):
                self._decode(entries[start : start + BATCH_TOKENS], params)
            self._prefix = tokens
        return len(tokens)

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
            eog = self._lib.llama_vocab_is_eog(self._vocab, token)
            piece = b"" if eog else self._llm.detokenize([token], special=False)
            guard = sequence.guard
            if guard is not None and (eog or b"\n" in piece):
                head = piece.split(b"\n", 1)[0]
                if guard.shape.refuse_known and guard.verdict(guard.line + head) == "repeat":
                    # this line may not end on a known caption: draw again without line ends
                    ends = self.line_end_tokens()
                    logits = self._lib.llama_get_logits_ith(self._ctx, i)
                    np.ctypeslib.as_array(logits, shape=(self._n_vocab,))[ends] = -np.inf
                    token = self._lib.llama_sampler_sample(sequence.sampler, self._ctx, i)
                    eog = self._lib.llama_vocab_is_eog(self._vocab, token)
                    piece = b"" if eog else self._llm.detokenize([token], special=False)
            if eog:
                if guard is not None:
                    guard.close_line(guard.line, guard.line_tokens)
                sequence.finish_reason = "stop"
            else:
                sequence.tokens.append(token)
                sequence.text += piece
                if guard is not None and self._guard_step(sequence, guard, piece):
                    sequence.finish_reason = "stop"
                elif self._stopped(sequence, params.stop):
                    sequence.finish_reason = "stop"
                elif len(sequence.tokens) >= params.max_tokens or position + 2 >= self.cells_per_sequence:
                    sequence.finish_reason = "length"
            if sequence.finish_reason:
                finished.append(sequence)
        return finished

    @staticmethod
    def _guard_step(sequence: _Sequence, guard: ListGuard, piece: bytes) -> bool:
        """Feed one token's text to the guard; True (and the reply cut after its last accepted
        line) once the reply holds its ``n`` new captions."""
        guard.line_tokens += 1
        if b"\n" not in piece:
            guard.line += piece
            return False
        *finished, rest = (guard.line + piece).split(b"\n")
        for k, line in enumerate(finished):
            # the token that ends a line counts toward it; later lines inside one token are empty
            if guard.close_line(line, guard.line_tokens if k == 0 else 0):
                after = len(rest) + 1 + sum(len(x) + 1 for x in finished[k + 1 :])  # "\n" + what follows
                sequence.text = sequence.text[: len(sequence.text) - after]
                return True
        guard.line, guard.line_tokens = rest, 0
        return False

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
            useful_tokens=None if sequence.guard is None else sequence.guard.useful_tokens,
            cached_prompt_tokens=sequence.cached,
        )
