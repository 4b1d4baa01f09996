"""GPU memory planning: one setting sizes vLLM's share and the scorer's batches together."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mils_pipeline.config import RunConfig
from mils_pipeline.errors import ConfigError
from mils_pipeline.memory import (
    CUDA_CONTEXT_BYTES,
    SCORER_MAX_SHARE,
    apply_gpu_plan,
    plan_for_config,
    plan_for_worker,
    plan_gpu_memory,
)
from mils_pipeline.score.footprint import ScorerFootprint, scorer_weight_bytes
from mils_pipeline.score.open_clip_image import footprint_from_open_clip_config
from tests.conftest import TINY_ARCHITECTURE

GIB = 1024**3
SMALL_SCORER = ScorerFootprint(weight_bytes=1 * GIB, text_bytes_per_item=2 * 1024**2, media_bytes_per_item=40 * 1024**2)


def test_scorer_and_vllm_split_exactly_the_usable_memory():
    plan = plan_gpu_memory(80 * GIB, 0.9, SMALL_SCORER, text_batch_size=256, media_batch_size=32)
    assert plan.usable_bytes == int(80 * GIB * 0.9) - CUDA_CONTEXT_BYTES
    assert plan.scorer_bytes + plan.generator_bytes == plan.usable_bytes
    assert (plan.text_batch_size, plan.media_batch_size) == (256, 32)  # they fit: kept as configured
    assert plan.gpu_memory_utilization == pytest.approx(plan.generator_bytes / (80 * GIB), abs=1e-4)
    assert plan.gpu_memory_utilization + plan.scorer_bytes / (80 * GIB) <= 0.9


def test_batches_shrink_until_the_scorer_fits_its_share():
    plan = plan_gpu_memory(16 * GIB, 0.9, SMALL_SCORER, text_batch_size=4096, media_batch_size=512)
    assert plan.scorer_bytes <= SCORER_MAX_SHARE * plan.usable_bytes
    assert plan.media_batch_size < 512 and plan.text_batch_size <= 4096
    bigger = plan_gpu_memory(80 * GIB, 0.9, SMALL_SCORER, text_batch_size=4096, media_batch_size=512)
    assert bigger.media_batch_size > plan.media_batch_size  # more memory, larger scorer batches


def test_one_setting_moves_both_shares():
    low = plan_gpu_memory(24 * GIB, 0.5, SMALL_SCORER, 256, 32)
    high = plan_gpu_memory(24 * GIB, 0.95, SMALL_SCORER, 256, 32)
    assert high.gpu_memory_utilization > low.gpu_memory_utilization
    assert low.gpu_memory_utilization < 0.5 and high.gpu_memory_utilization < 0.95


def test_a_scorer_that_leaves_vllm_nothing_is_a_config_error():
    huge = ScorerFootprint(weight_bytes=7 * GIB, text_bytes_per_item=1, media_bytes_per_item=1)
    with pytest.raises(ConfigError, match=r"gpu\.memory_fraction"):
        plan_gpu_memory(8 * GIB, 0.9, huge, 1, 1)


def test_plan_from_a_run_config_and_a_real_open_clip_model(tiny_scorer):
    config = RunConfig.model_validate({"gpu": {"memory_fraction": 0.8}, "scorer": {"media_batch_size": 16}})
    weights = scorer_weight_bytes(tiny_scorer._model)
    assert weights == sum(p.numel() * 4 for p in tiny_scorer._model.parameters()) + sum(
        b.numel() * b.element_size() for b in tiny_scorer._model.buffers()
    )
    footprint = tiny_scorer.footprint()  # fp32 on CPU: 4 bytes per element
    assert footprint == footprint_from_open_clip_config(TINY_ARCHITECTURE, weights, element_bytes=4)
    assert footprint.text_bytes_per_item > 0
    assert footprint.media_bytes_per_item > 3 * 32 * 32 * 4  # more than the pixels of one 32x32 image
    plan = plan_for_config(config, 24 * GIB, footprint)
    assert plan.media_batch_size == 16 and plan.text_batch_size == config.scorer.text_batch_size
    assert 0.7 < plan.gpu_memory_utilization < 0.8
    assert "gpu_memory_utilization=" in plan.describe()


def test_memory_fraction_is_validated_and_does_not_change_the_dataset_hash():
    with pytest.raises(ValueError):
        RunConfig.model_validate({"gpu": {"memory_fraction": 1.5}})
    assert RunConfig().config_sha256() == RunConfig.model_validate({"gpu": {"memory_fraction": 0.5}}).config_sha256()


def test_siglip_shapes_come_from_timm_and_fit_an_80_gib_gpu():
    import open_clip

    siglip = open_clip.get_model_config("ViT-SO400M-14-SigLIP")  # shipped with open_clip: no download
    footprint = footprint_from_open_clip_config(siglip, weight_bytes=int(1.75 * GIB), element_bytes=2)
    # 256 patches of width 1152 with a 4304-wide MLP: megabytes per image, far more than per 16-token text
    assert 5 * 1024**2 < footprint.media_bytes_per_item < 100 * 1024**2
    assert footprint.text_bytes_per_item < footprint.media_bytes_per_item / 10
    plan = plan_gpu_memory(80 * GIB, 0.9, footprint, 256, 32)
    print(plan.describe())
    assert plan.media_batch_size == 32 and 0.8 < plan.gpu_memory_utilization < 0.9


def test_a_worker_applies_the_plan_to_vllm_and_the_scorer_without_a_new_dataset_version(tiny_scorer):
    config = RunConfig.model_validate({"generator": {"backend": "vllm"}, "gpu": {"memory_fraction": 0.5}})
    assert plan_for_worker(config, tiny_scorer) is None  # a CPU scorer: the configured values stand
    plan = plan_for_config(config, 16 * GIB, tiny_scorer.footprint())
    planned = apply_gpu_plan(config, plan)
    assert planned.generator.gpu_memory_utilization == plan.gpu_memory_utilization < 0.5
    assert planned.scorer.media_batch_size == plan.media_batch_size
    assert planned.config_sha256() == config.config_sha256()


class CudaScorerWithoutAModel:
    """All the planner may read of a scorer: where it runs and its footprint (no model inside)."""

    device = "cuda:0"

    def footprint(self) -> ScorerFootprint:
        return SMALL_SCORER


def test_a_vllm_worker_plans_from_the_scorers_device_and_footprint_alone(monkeypatch):
    import torch

    # no GPU here: the device's size is the one thing faked
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
    settings = {
        "generator": {"backend": "vllm"},
        "gpu": {"memory_fraction": 0.9},
        "optimize": {"operators": ["rewrite"]},
    }
    config = RunConfig.model_validate(settings)
    scorer = CudaScorerWithoutAModel()
    assert plan_for_worker(config, scorer) == plan_for_config(config, 80 * GIB, SMALL_SCORER)
    words_only = RunConfig.model_validate({**settings, "optimize": {"operators": ["crossover"]}})
    assert plan_for_worker(words_only, scorer) is None  # no engine starts: the scorer has the device
    served = RunConfig.model_validate({"generator": {"backend": "openai"}, "gpu": {"memory_fraction": 0.9}})
    assert plan_for_worker(served, scorer) is None  # vLLM elsewhere: nothing to share the device with


def test_an_explicit_vllm_share_stands_when_it_fits_and_is_refused_when_it_would_overcommit(tiny_scorer):
    from mils_pipeline.errors import ConfigError

    modest = RunConfig.model_validate({"generator": {"backend": "vllm", "gpu_memory_utilization": 0.3}})
    plan = plan_for_config(modest, 16 * GIB, tiny_scorer.footprint())
    assert plan.gpu_memory_utilization > 0.3
    assert apply_gpu_plan(modest, plan).generator.gpu_memory_utilization == 0.3  # the user's choice stands
    greedy = RunConfig.model_validate({"generator": {"backend": "vllm", "gpu_memory_utilization": 0.95}})
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization=0\.95 .* set it to 0\.\d+ or less"):
        apply_gpu_plan(greedy, plan_for_config(greedy, 16 * GIB, tiny_scorer.footprint()))
    default = RunConfig.model_validate({"generator": {"backend": "vllm"}})
    planned = apply_gpu_plan(default, plan)
    assert planned.generator.gpu_memory_utilization == plan.gpu_memory_utilization  # not set: the plan's


def test_the_plan_sizes_clap_and_xclip_scorers_from_their_own_footprints():
    from mils_pipeline.score import build_scorer
    from tests.av_models import tiny_clap_settings, tiny_xclip_settings

    for modality, settings in (("audio", tiny_clap_settings()), ("video", tiny_xclip_settings())):
        config = RunConfig.model_validate({"modality": modality, "scorer": settings, "generator": {"backend": "vllm"}})
        scorer = build_scorer(config.scorer, modality)
        footprint = scorer.footprint()
        plan = plan_for_config(config, 24 * GIB, footprint)
        assert plan.scorer_bytes >= footprint.weight_bytes + footprint.media_bytes_per_item * plan.media_batch_size
        assert plan.scorer_bytes + plan.generator_bytes == plan.usable_bytes
        planned = apply_gpu_plan(config, plan)
        assert planned.generator.gpu_memory_utilization == plan.gpu_memory_utilization
        assert planned.config_sha256() == config.config_sha256()


PLAN_WITHOUT_OPEN_CLIP = """
import json, sys, types
sys.modules["open_clip"] = None  # not installed: any import of it raises ImportError
sys.modules["timm"] = None
import torch
from mils_pipeline.config import RunConfig
from mils_pipeline.memory import plan_for_worker
from mils_pipeline.score import build_scorer
from tests.av_models import tiny_clap_settings

config = RunConfig.model_validate({"modality": "audio", "scorer": tiny_clap_settings(),
                                   "generator": {"backend": "vllm"}, "optimize": {"operators": ["rewrite"]}})
scorer = build_scorer(config.scorer, "audio")
scorer.device = "cuda:0"  # no GPU here: where a GPU worker's scorer runs, and the device's size, are given
torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(total_memory=24 * 1024**3)
plan = plan_for_worker(config, scorer)
print(json.dumps({"utilization": plan.gpu_memory_utilization, "media_batch": plan.media_batch_size,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("open_clip", "timm")
                                   and sys.modules[m] is not None)}))
"""


def test_a_gpu_worker_plans_memory_for_a_clap_scorer_without_open_clip_installed():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", PLAN_WITHOUT_OPEN_CLIP], capture_output=True, text=True, env=env, cwd=root, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.05 < result["utilization"] < 0.9 and result["media_batch"] >= 1
    assert result["loaded"] == []
