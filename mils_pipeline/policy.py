"""The worker policy: what a run may make this machine do, whoever submitted it.

On a fleet, anyone who can create a flow run chooses the whole run configuration, and the run
executes where the GPUs, the credentials and the storage are. A run can name a shell command
(a ``pipe:`` shard URL), an environment variable whose value is sent as an API key
(``generator.api_key_env``), the server it is sent to (``generator.base_url``), and paths and
buckets to read and write. The policy says which of those this machine accepts. It comes only from
the machine's own environment (settings.py: the ``MILS_*`` policy variables, and the YAML file
``MILS_POLICY_FILE`` names), never from a run configuration or flow parameters, and every entry
point checks a run against it before any model loads or any byte is read (``check_run``).

Defaults (nothing set): no ``pipe:`` URLs, ``OPENAI_API_KEY`` the only API key variable, the
worker's own generator server ($OPENAI_BASE_URL) the only one, and sources, outputs and model files
anywhere: a single machine belongs to the user who runs it. A fleet's workers set the prefixes
(README: Running on a cluster).
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mils_pipeline.config import BaseGeneratorConfig, OpenAIGeneratorConfig, RunConfig, ScorerConfig
from mils_pipeline.errors import MilsError
from mils_pipeline.settings import settings


class PolicyError(MilsError):
    """The run asks this machine for something its worker policy does not allow; nothing was run,
    loaded, read or written."""


class WorkerPolicy(BaseModel):
    """The policy keys; each is also the variable ``MILS_<KEY>`` (lists comma-separated). Prefixes
    and directories: None is anywhere; a list is only under one of its entries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_pipe_urls: bool = False
    api_key_variables: tuple[str, ...] = ("OPENAI_API_KEY",)
    generator_base_urls: tuple[str, ...] = ()
    source_prefixes: tuple[str, ...] | None = None
    output_prefixes: tuple[str, ...] | None = None
    model_dirs: tuple[str, ...] | None = None


def variable(key: str) -> str:
    """The environment variable of a policy key."""
    return f"MILS_{key.upper()}"


def worker_policy() -> WorkerPolicy:
    """This machine's policy as its environment says now: the file's keys, then the variables over
    them. A policy file that cannot be read refuses every run (it never falls back to defaults)."""
    env = settings()
    keys: dict[str, Any] = _policy_file(env.mils_policy_file) if env.mils_policy_file else {}
    for key in WorkerPolicy.model_fields:
        value = getattr(env, f"mils_{key}")
        if value is not None:
            keys[key] = value
    try:
        return WorkerPolicy.model_validate(keys)
    except ValidationError as exc:
        where = env.mils_policy_file or "MILS_* variables"
        raise PolicyError(f"the worker policy ({where}) is invalid: {exc}") from None


def _policy_file(path: Path) -> dict[str, Any]:
    try:
        keys = yaml.safe_load(path.expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"the worker policy file MILS_POLICY_FILE={path} cannot be read: {exc}") from exc
    if keys is None:
        return {}
    if not isinstance(keys, dict):
        raise PolicyError(f"the worker policy file {path} must hold a mapping of policy keys")
    return keys


def check_run(
    config: RunConfig, source: str | None = None, output: str | None = None, shard_name: str | None = None
) -> None:
    """Refuse (PolicyError, every reason at once) a run this machine's policy does not allow.
    ``source`` is the run's source or one shard's URL; ``shard_name`` a shard unit's name, which
    names files under ``output``."""
    policy = worker_policy()
    refusals = [
        *_source_refusals(policy, config, source),
        *_generator_refusals(policy, config.generator),
        *_write_refusals(policy, config, output),
        *_model_refusals(policy, config),
    ]
    if shard_name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", shard_name):
        refusals.append(
            f"shard name {shard_name!r} is not one the planner makes (letters, digits, '.', '_', '-'): it names "
            "files under the output"
        )
    _refuse(refusals)


def check_generator(generator: BaseGeneratorConfig) -> None:
    """Refuse a generator that would send a credential of this machine, or any request, to a server
    the policy does not allow."""
    _refuse(_generator_refusals(worker_policy(), generator))


def check_pipe_allowed(url: str) -> None:
    """Refuse a ``pipe:`` URL unless this machine's policy allows shell commands as shards."""
    if not worker_policy().allow_pipe_urls:
        _refuse([_pipe_refusal(url)])


def check_worker_file(path: str, setting: str) -> None:
    """Refuse a file of this machine named by a run (``setting`` says where) outside the model
    directories."""
    _refuse(_outside(worker_policy(), "model_dirs", path, setting))


def _refuse(refusals: list[str]) -> None:
    if refusals:
        raise PolicyError("this worker's policy refuses the run: " + "; ".join(refusals))


def _pipe_refusal(url: str) -> str:
    return (
        f"{url!r} is a pipe: URL, a shell command on this worker, and the worker allows none: its operator "
        f"can set {variable('allow_pipe_urls')}=true on the worker (storage.allow_pipe_urls alone is not enough)"
    )


def _source_refusals(policy: WorkerPolicy, config: RunConfig, source: str | None) -> list[str]:
    if source is None:
        return []
    if source.startswith("pipe:"):
        # without storage.allow_pipe_urls the shard reader refuses it, naming that setting
        allowed = policy.allow_pipe_urls or not config.storage.allow_pipe_urls
        return [] if allowed else [_pipe_refusal(source)]
    return _outside(policy, "source_prefixes", source, "source")


def _generator_refusals(policy: WorkerPolicy, generator: BaseGeneratorConfig) -> list[str]:
    if not isinstance(generator, OpenAIGeneratorConfig):
        return []
    refusals = []
    if generator.api_key is None and generator.api_key_env not in policy.api_key_variables:
        refusals.append(
            f"generator.api_key_env {generator.api_key_env!r} is not a variable this worker lends as an API key "
            f"(it lends {', '.join(policy.api_key_variables) or 'none'}: {variable('api_key_variables')})"
        )
    if generator.base_url is not None:
        own = settings().openai_base_url
        allowed = {_server(url) for url in (own, *policy.generator_base_urls) if url}
        server = _server(generator.base_url)
        if server is None or server not in allowed:
            refusals.append(
                f"generator.base_url {generator.base_url!r} is not a generator server this worker allows: leave "
                "it empty for the worker's own ($OPENAI_BASE_URL), or its operator adds it to "
                f"{variable('generator_base_urls')}"
            )
    return refusals


def _write_refusals(policy: WorkerPolicy, config: RunConfig, output: str | None) -> list[str]:
    targets = [(output, "output"), (config.seed_pool.dir, "seed_pool.dir")]
    targets.append((config.scorer.cache_dir, "scorer.cache_dir"))
    targets += [(extra.cache_dir, f"extra_scorers.{i}.cache_dir") for i, extra in enumerate(config.extra_scorers)]
    if config.publish.hub_repo:
        targets.append((f"hf://datasets/{config.publish.hub_repo}", "publish.hub_repo"))
    return [refusal for url, setting in targets if url for refusal in _outside(policy, "output_prefixes", url, setting)]


def _model_refusals(policy: WorkerPolicy, config: RunConfig) -> list[str]:
    pool = config.seed_pool.pool  # an id or a bundled name has no slash; anything else is a path
    files: list[tuple[str | None, str]] = [(pool if "/" in pool else _local_name(pool), "seed_pool.pool")]
    if config.generator.backend == "llamacpp":
        files.append((config.generator.model, "generator.model"))
    elif config.generator.backend == "vllm" and config.generator.model:
        files.append((_local_name(config.generator.model), "generator.model"))
    scorers = [("scorer", config.scorer), *((f"extra_scorers.{i}", s) for i, s in enumerate(config.extra_scorers))]
    for where, scorer in scorers:
        files += _scorer_files(scorer, where)
    return [refusal for path, setting in files if path for refusal in _outside(policy, "model_dirs", path, setting)]


def _scorer_files(scorer: ScorerConfig, where: str) -> list[tuple[str | None, str]]:
    files = [(scorer.checkpoint, f"{where}.checkpoint"), (_local_name(scorer.model), f"{where}.model")]
    if scorer.backend == "open_clip" and scorer.pretrained:  # open_clip takes a file path as well as a tag
        files.append((_local_name(scorer.pretrained), f"{where}.pretrained"))
    return files


def _local_name(name: str) -> str | None:
    """``name`` when it names a file or directory of this machine (rather than a hub id, a tag or
    a bundled name): a path by its form, or by existing here."""
    if name.startswith(("/", "~", ".")) or Path(name).expanduser().exists():
        return name
    return None


def _outside(policy: WorkerPolicy, key: str, url: str, setting: str) -> list[str]:
    """A refusal when ``url`` is not under one of the policy's ``key`` entries (none when unset)."""
    allowed: tuple[str, ...] | None = getattr(policy, key)
    if allowed is None:
        return []
    location = _location(url)
    if location is not None:
        for prefix in allowed:
            root = _location(prefix)
            if root is not None and (location == root or location.startswith(root.rstrip("/") + "/")):
                return []
    return [
        f"{setting} {url!r} is outside what this worker allows ({variable(key)}: {', '.join(allowed) or 'nothing'})"
    ]


def _location(url: str) -> str | None:
    """A comparable form: a local path resolved (symbolic links and '..' included), a URL as written
    with no trailing slash. None for a URL with '.' or '..' segments, which a store may or may not
    resolve: it is refused rather than guessed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme in ("file", "local"):
        return os.path.realpath(os.path.expanduser(rest if sep else url))
    if any(part in (".", "..") for part in rest.split("/")):
        return None
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def _server(url: str) -> str | None:
    """A generator server URL compared by scheme, host, port and path (user info dropped). None when
    it does not parse as an http(s) URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    path = posixpath.normpath(parts.path).rstrip("/") if parts.path else ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme.lower()}://{parts.hostname}:{port}{path}{query}"
