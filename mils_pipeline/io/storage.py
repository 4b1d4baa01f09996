"""Object-store access for every fsspec call of the process, set in one place.

fsspec applies ``fsspec.config.conf[protocol]`` as default keyword arguments whenever it creates a
filesystem, so the shard reader, the Parquet writer, manifests and the card all reach the same
endpoint without passing options around. Credentials are never set here: s3fs finds them in the
standard AWS environment variables, profile files or the machine's role.
"""

from __future__ import annotations

import fsspec.config

from mils_pipeline.config import StorageConfig


def s3_options(config: StorageConfig) -> dict:
    options: dict = {"config_kwargs": {"retries": {"max_attempts": config.max_attempts, "mode": "standard"}}}
    client_kwargs = {}
    if config.endpoint_url:
        client_kwargs["endpoint_url"] = config.endpoint_url
    if config.region:
        client_kwargs["region_name"] = config.region
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    if config.profile:
        options["profile"] = config.profile
    return options


def configure_storage(config: StorageConfig) -> None:
    """Make ``config`` the default for every s3:// filesystem this process creates from now on."""
    options = s3_options(config)
    for protocol in ("s3", "s3a"):
        fsspec.config.conf[protocol] = dict(options)
