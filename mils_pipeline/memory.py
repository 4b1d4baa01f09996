"""GPU memory planning: one setting (``gpu.memory_fraction``) sizes vLLM's memory share and the
scorer's batches together.

A GPU worker runs the generator (vLLM) and the scorer in one process on one device. vLLM takes
``gpu_memory_utilization`` of the whole device for its weights and KV cache and assumes the rest
is free; the scorer needs its weights plus the activations of its largest batch. The plan gives the
scorer what it needs first (its configured batch sizes, halved while they take more than
``SCORER_MAX_SHARE`` of the usable memory) and vLLM all that remains, so the two never overcommit.
The figures are estimates from the model's shapes, with headroom; they are printed, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import ConfigError
from mils_pipeline.operators import LLM_OPERATORS
from mils_pipeline.score.base import Scorer
from mils_pipeline.score.footprint import ScorerFootprint

CUDA_CONTEXT_BYTES = 512 * 1024**2  # CUDA context, cuBLAS workspaces and allocator slack per process
SCORER_MAX_SHARE = 0.25  # of the usable memory, for the scorer's weights and batches together
ACTIVATION_HEADROOM = 2.0  # allocator fragmentation and temporaries the shape estimate leaves out
MIN_GENERATOR_SHARE = 0.05  # below this vLLM cannot hold a useful KV cache


@dataclass(frozen=True)
class GpuPlan:
    total_bytes: int
    usable_bytes: int
    scorer_bytes: int
    generator_bytes: int
    gpu_memory_utilization: float  # vLLM's LLM(gpu_memory_utilization=...): its share of the device
    text_batch_size: int  # scorer.text_batch_size to use
    media_batch_size: int  # scorer.media_batch_size to use

    def describe(self) -> str:
        gib = 1024**3
        return (
            f"GPU {self.total_bytes / gib:.1f} GiB, usable {self.usable_bytes / gib:.1f} GiB: "
            f"scorer {self.scorer_bytes / gib:.2f} GiB (text batch {self.text_batch_size}, media batch "
            f"{self.media_batch_size}), vLLM {self.generator_bytes / gib:.1f} GiB "
            f"(gpu_memory_utilization={self.gpu_memory_utilization:.3f})"
        )


def _scorer_bytes(footprint: ScorerFootprint, text_batch: int, media_batch: int) -> int:
    # text and media batches do not run at the same time: the larger one sets the peak
    peak = max(footprint.text_bytes_per_item * text_batch, footprint.media_bytes_per_item * media_batch)
    return footprint.weight_bytes + int(ACTIVATION_HEADROOM * peak)


def plan_gpu_memory(
    total_bytes: int,
    memory_fraction: float,
    scorer: ScorerFootprint,
    text_batch_size: int,
    media_batch_size: int,
) -> GpuPlan:
    """Split ``memory_fraction`` of a device of ``total_bytes`` between the scorer and vLLM.

    The configured batch sizes are upper bounds: each is halved (the larger consumer first) until
    the scorer fits in ``SCORER_MAX_SHARE`` of the usable memory or both reach 1.
    """
    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"gpu.memory_fraction must be in (0, 1], got {memory_fraction}")
    usable = int(total_bytes * memory_fraction) - CUDA_CONTEXT_BYTES
    text_batch, media_batch = max(1, text_batch_size), max(1, media_batch_size)
    limit = SCORER_MAX_SHARE * usable
    while _scorer_bytes(scorer, text_batch, media_batch) > limit and (text_batch > 1 or media_batch > 1):
        text_peak = scorer.text_bytes_per_item * text_batch
        media_peak = scorer.media_bytes_per_item * media_batch
        if media_batch > 1 and (media_peak >= text_peak or text_batch == 1):
            media_batch //= 2
        else:
            text_batch //= 2
    scorer_bytes = _scorer_bytes(scorer, text_batch, media_batch)
    generator_bytes = usable - scorer_bytes
    if generator_bytes < MIN_GENERATOR_SHARE * total_bytes:
        raise ConfigError(
            f"the scorer needs {scorer_bytes / 1024**3:.1f} GiB of the {usable / 1024**3:.1f} GiB that "
            f"gpu.memory_fraction={memory_fraction} leaves usable, so vLLM would get almost nothing: raise "
            "gpu.memory_fraction, use a smaller scorer or lower precision, or run the generator elsewhere "
            "(generator.backend=openai)"
        )
    return GpuPlan(
        total_bytes=total_bytes,
        usable_bytes=usable,
        scorer_bytes=scorer_bytes,
        generator_bytes=generator_bytes,
        gpu_memory_utilization=round(generator_bytes / total_bytes, 4),
        text_batch_size=text_batch,
        media_batch_size=media_batch,
    )


def plan_for_config(config: RunConfig, total_bytes: int, scorer: ScorerFootprint) -> GpuPlan:
    """The plan for a run: ``gpu.memory_fraction``, with the configured scorer batch sizes as caps."""
    return plan_gpu_memory(
        total_bytes,
        config.gpu.memory_fraction,
        scorer,
        config.scorer.text_batch_size,
        config.scorer.media_batch_size,
    )


def apply_gpu_plan(config: RunConfig, plan: GpuPlan) -> RunConfig:
    """``config`` with vLLM's share and the scorer's batch sizes taken from ``plan``. All three are
    execution-only settings: the config hash, and so the dataset version, does not change.

    A ``generator.gpu_memory_utilization`` the user set stands, when it leaves the scorer what the
    plan gives it; one that does not is a ConfigError (the two would overcommit the device)."""
    share = plan.gpu_memory_utilization
    if "gpu_memory_utilization" in config.generator.model_fields_set:
        share = config.generator.gpu_memory_utilization
        if share > plan.gpu_memory_utilization + 1e-4:
            gib = 1024**3
            raise ConfigError(
                f"generator.gpu_memory_utilization={share} gives vLLM {share * plan.total_bytes / gib:.1f} GiB of "
                f"the {plan.total_bytes / gib:.1f} GiB device, leaving the scorer less than the "
                f"{plan.scorer_bytes / gib:.2f} GiB it needs within gpu.memory_fraction="
                f"{plan.usable_bytes / plan.total_bytes:.2f}: set it to {plan.gpu_memory_utilization} or less, "
                "or leave it out and the plan sizes vLLM's share"
            )
    return config.model_copy(
        update={
            "generator": config.generator.model_copy(update={"gpu_memory_utilization": share}),
            "scorer": config.scorer.model_copy(
                update={"text_batch_size": plan.text_batch_size, "media_batch_size": plan.media_batch_size}
            ),
        }
    )


def plan_for_worker(config: RunConfig, scorer: Scorer) -> GpuPlan | None:
    """The plan for a GPU worker that runs vLLM in-process beside a scorer on CUDA, from the
    device's real size and the loaded scorer's footprint; None anywhere else (CPU, other generator
    backends, or a run whose operators never call the LLM, so no engine starts), where the configured
    values stand."""
    uses_llm = any(o in LLM_OPERATORS for o in config.optimize.operators)
    if config.generator.backend != "vllm" or not uses_llm or not scorer.device.startswith("cuda"):
        return None
    import torch

    total = torch.cuda.get_device_properties(torch.device(scorer.device)).total_memory
    return plan_for_config(config, total, scorer.footprint())
