"""The process environment, read in one place.

A run's configuration (config.py) says what to compute; the environment says where this process
keeps its state and how it reaches services, and holds credentials, which never go into a config.
Everything the library reads from the environment is read here.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The environment variables the library reads (an empty variable counts as unset)."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", frozen=True)

    mils_home: Path = Field(
        Path.home() / ".cache" / "mils", description="Where state is kept between runs (seed pools, embeddings)."
    )
    mils_worker_name: str | None = Field(None, description="This worker's name in run summaries. Unset: hostname.")
    openai_base_url: str | None = Field(None, description="Server URL of the openai generator backend.")
    hf_token: SecretStr | None = Field(None, description="Hugging Face token for publishing to the hub.")


def settings() -> Settings:
    """The environment as it is now: read on each call (it is cheap), so a changed variable counts."""
    return Settings()


def secret_from_env(name: str) -> str | None:
    """A credential from the variable ``name`` when the variable's name is itself a setting
    (``generator.api_key_env``) or one of a list (logs.SECRET_VARIABLES); None when unset or empty."""
    return os.environ.get(name) or None
