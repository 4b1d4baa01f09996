"""The models, seed pool and loop of one process, built once and reused for every shard it runs.

A process counts the models it builds (``model_builds``): each shard's manifest records the count,
so a fleet's outputs show whether its workers reloaded models per shard.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mils_pipeline.config import RunConfig
from mils_pipeline.generate import Generator, UnusedGenerator, build_generator
from mils_pipeline.io.storage import configure_storage
from mils_pipeline.memory import apply_gpu_plan, plan_for_worker
from mils_pipeline.operators import LLM_OPERATORS
from mils_pipeline.optimize import MilsOptimizer
from mils_pipeline.run.gpu import GpuClaim, claim_gpus
from mils_pipeline.score import CachedTextEncoder, Scorer, build_scorer, build_text_encoder
from mils_pipeline.score.objective import MEDIA_PARTS, Component
from mils_pipeline.seeding import SeedPool, load_seed_pool, pool_embeddings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int | None], None]  # (what, advance, total)

_BUILDS: Counter[str] = Counter()


def model_builds() -> dict[str, int]:
    """How many scorers and generators this process has built so far."""
    return {"scorer": _BUILDS["scorer"], "generator": _BUILDS["generator"]}


def no_progress(what: str, advance: int, total: int | None) -> None:
    return None


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@dataclass
class Runtime:
    """Models, seed pool and loop of one process, built once and reused for every shard."""

    config: RunConfig
    generator: Generator
    scorer: Scorer
    encoder: CachedTextEncoder
    seed_pool: SeedPool
    optimizer: MilsOptimizer
    run_id: str
    seconds_setup: float
    gpu_claim: GpuClaim | None = None

    @property
    def components(self) -> list[Component]:
        """Every scorer of the objective: the main one, then those combined with it."""
        return self.optimizer.objective.components

    def close(self) -> None:
        self.generator.close()
        for component in self.components:
            if component.encoder.store is not None:
                component.encoder.store.close()
        if self.gpu_claim is not None:
            self.gpu_claim.release()

    def decode_options(self) -> dict[str, Any]:
        """What the scorers ask of the decoder (frames per clip, audio rate and windows)."""
        options: dict[str, Any] = {}
        for component in self.components:
            options.update(component.scorer.decode_options)
        return options

    def scorer_rows(self) -> list[dict[str, Any]]:
        """Every scorer of the objective, with its weight: the `scorers` column."""
        return [{"name": c.name, "weight": c.weight, **c.scorer.identity.as_row()} for c in self.components]

    def model_identities(self) -> dict[str, dict[str, Any]]:
        return {"generator": self.generator.identity.as_row(), "scorer": self.scorer.identity.as_row()}


def uses_gpu(config: RunConfig) -> bool:
    """Whether this process will compute on CUDA for this config (its scorer or an in-process vLLM)."""
    if config.scorer.device == "cpu" and config.generator.backend != "vllm":
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def build_runtime(config: RunConfig, run_id: str | None = None, progress: Progress = no_progress) -> Runtime:
    started = time.perf_counter()
    # before any model loads: a second unit on the same GPU is refused, not left to run out of memory
    gpu_claim = claim_gpus() if uses_gpu(config) else None
    try:
        return _build_runtime(config, run_id, progress, started, gpu_claim)
    except BaseException:
        if gpu_claim is not None:
            gpu_claim.release()
        raise


def _build_runtime(
    config: RunConfig, run_id: str | None, progress: Progress, started: float, gpu_claim: GpuClaim | None
) -> Runtime:
    configure_storage(config.storage)
    pool = load_seed_pool(config.seed_pool.pool, config.seed_pool.dir)
    scorer = build_scorer(config.scorer, config.modality)
    _BUILDS["scorer"] += 1
    plan = plan_for_worker(config, scorer)
    if plan is not None:  # one setting (gpu.memory_fraction) sizes vLLM and the scorer together
        log.info("GPU memory plan: %s", plan.describe())
        config = apply_gpu_plan(config, plan)
        scorer.media_batch_size = plan.media_batch_size
    embeddings = pool_embeddings(
        pool,
        scorer,
        config.scorer.text_batch_size,
        config.seed_pool.dir,
        progress=lambda n: progress("embedding seed pool", n, len(pool.texts)),
    )
    extra_components = []
    for extra in config.extra_scorers:
        extra_scorer = build_scorer(extra, extra.media)
        _BUILDS["scorer"] += 1
        extra_embeddings = pool_embeddings(pool, extra_scorer, extra.text_batch_size, config.seed_pool.dir)
        extra_encoder = build_text_encoder(extra_scorer, extra)
        extra_components.append(
            Component(extra.media, extra.weight, extra_encoder, extra_embeddings, MEDIA_PARTS[extra.media])
        )
    if any(o in LLM_OPERATORS for o in config.optimize.operators):
        generator: Generator = build_generator(config.generator)
        _BUILDS["generator"] += 1
    else:  # word operators only: no LLM weights to load, no engine to start
        generator = UnusedGenerator(config.generator, f"optimize.operators is {config.optimize.operators}")
    encoder = build_text_encoder(scorer, config.scorer)
    optimizer = MilsOptimizer(generator, encoder, pool, embeddings, config, extra_components)
    return Runtime(
        config=config,
        generator=generator,
        scorer=scorer,
        encoder=encoder,
        seed_pool=pool,
        optimizer=optimizer,
        run_id=run_id or new_run_id(),
        seconds_setup=time.perf_counter() - started,
        gpu_claim=gpu_claim,
    )


_RUNTIMES: dict[str, Runtime] = {}


def shared_runtime(config: RunConfig) -> Runtime:
    """The process's runtime for this config, built on first use: a process that captions many
    shards loads its models and seed pool once."""
    key = config.model_dump_json()
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        runtime = _RUNTIMES[key] = build_runtime(config)
    return runtime


def discard_runtime(config: RunConfig) -> bool:
    """Close and forget this config's shared runtime (and the process's vLLM engines) after a
    unit failed inside a model: a retry then loads afresh instead of reusing a dead engine or a
    scorer in a broken CUDA state. Returns whether there was one."""
    runtime = _RUNTIMES.pop(config.model_dump_json(), None)
    if runtime is None:
        return False
    runtime.close()
    vllm_backend = sys.modules.get("mils_pipeline.generate.vllm")
    if vllm_backend is not None:
        vllm_backend.release_engines()
    return True


def release_runtimes() -> None:
    """Close every runtime this process keeps (and the vLLM engines they used): models leave
    memory, the next unit builds afresh."""
    while _RUNTIMES:
        _, runtime = _RUNTIMES.popitem()
        runtime.close()
    vllm_backend = sys.modules.get("mils_pipeline.generate.vllm")
    if vllm_backend is not None:  # only when this process loaded the backend: never import vLLM here
        vllm_backend.release_engines()
