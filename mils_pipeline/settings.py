"""The process environment, read in one place.

A run's configuration (config.py) says what to compute; the environment says where this process
keeps its state and how it reaches services, and holds credentials, which never go into a config.
Everything the library reads from the environment is read here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _comma_separated(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


# A list variable: comma-separated values (the policy file takes values that contain commas)
CommaSeparated = Annotated[tuple[str, ...] | None, NoDecode, BeforeValidator(_comma_separated)]


class Settings(BaseSettings):
    """The environment variables the library reads (an empty variable counts as unset)."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", frozen=True)

    mils_home: Path = Field(
        Path.home() / ".cache" / "mils", description="Where state is kept between runs (seed pools, embeddings)."
    )
    mils_worker_name: str | None = Field(None, description="This worker's name in run summaries. Unset: hostname.")
    mils_project_dir: Path | None = Field(
        None, description="Where a worker finds this repository (flows/, deploy/): deployments' pull step."
    )
    openai_base_url: str | None = Field(None, description="Server URL of the openai generator backend.")
    hf_token: SecretStr | None = Field(None, description="Hugging Face token for publishing to the hub.")
    # The worker policy (policy.py): what a run, whoever submitted it, may make this machine do. A
    # variable set here wins over the same key in MILS_POLICY_FILE; unset in both: the default.
    mils_policy_file: Path | None = Field(
        None, description="A YAML file of worker policy keys (policy.py: WorkerPolicy), on this machine."
    )
    mils_allow_pipe_urls: bool | None = Field(
        None, description="Worker policy: accept `pipe:` shard URLs (a shell command per shard). Default: no."
    )
    mils_api_key_variables: CommaSeparated = Field(
        None, description="Worker policy: variables a run may name as generator.api_key_env. Default: OPENAI_API_KEY."
    )
    mils_generator_base_urls: CommaSeparated = Field(
        None,
        description="Worker policy: generator servers a run may name as generator.base_url, besides "
        "$OPENAI_BASE_URL. Default: none.",
    )
    mils_source_prefixes: CommaSeparated = Field(
        None, description="Worker policy: where shards may be read (paths, s3://bucket/prefix). Default: anywhere."
    )
    mils_output_prefixes: CommaSeparated = Field(
        None,
        description="Worker policy: where a run may write (output, seed_pool.dir, scorer.cache_dir, "
        "hf://datasets/<repo> for publish.hub_repo). Default: anywhere.",
    )
    mils_model_dirs: CommaSeparated = Field(
        None,
        description="Worker policy: directories of the files a run may name besides shards (model weights, "
        "checkpoints, seed pool files, config files). Default: anywhere.",
    )


def settings() -> Settings:
    """The environment as it is now: read on each call (it is cheap), so a changed variable counts."""
    return Settings()


def secret_from_env(name: str) -> str | None:
    """A credential from the variable ``name`` when the variable's name is itself a setting
    (``generator.api_key_env``) or one of a list (logs.SECRET_VARIABLES); None when unset or empty."""
    return os.environ.get(name) or None
