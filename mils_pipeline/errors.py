"""The project's own exception types.

Every error a user can cause (bad config, unreadable shard, corrupt sample, model not available
offline, output conflict) is one of these, with a message that says what to do next.
"""

from __future__ import annotations


class MilsError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(MilsError):
    """The run configuration is invalid; raised before any work starts."""


class MediaDecodeError(MilsError):
    """One sample's media could not be decoded. The sample is quarantined; the shard goes on."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class ShardReadError(MilsError):
    """A shard could not be listed, opened or read."""


class ModelUnavailableError(MilsError):
    """Model weights or files could not be loaded (typically: not available offline)."""


class OutputError(MilsError):
    """The output location cannot be written, or holds a different dataset version."""


class SeedPoolError(MilsError):
    """A seed pool could not be found, read or generated."""


class GenerationError(MilsError):
    """The generator failed in a way that retrying the same call will not fix."""


class WorkerSetupError(MilsError):
    """The worker is set up in a way that cannot run a unit as deployed (two units sharing one GPU,
    no project directory): refused before any model loads, with the setting to change."""


class PublishError(MilsError):
    """A finished dataset could not be published (hub push)."""


class ShardsFailedError(MilsError):
    """Some shards of a run failed; the others finished and are kept. Rerunning the same command
    retries only the failed ones."""

    def __init__(self, failures: dict[str, str], summary: object = None) -> None:
        listing = "; ".join(f"{name}: {reason}" for name, reason in sorted(failures.items()))
        super().__init__(
            f"{len(failures)} shard(s) failed ({listing}). The other shards are done and kept; fix the "
            "cause and rerun the same command: only the failed shards run again"
        )
        self.failures = failures
        self.summary = summary


class EvaluationError(MilsError):
    """Captions or references cannot be read or matched, or a caption metric cannot run."""


def is_refusal(exc: BaseException) -> bool:
    """True for an error the same call raises again: one of this project's errors raised by a check
    (a config mismatch, an output holding another dataset version), not one wrapping an I/O failure
    (an ``OSError`` anywhere in its chain: a store down, a timeout) that a retry may get past."""
    if not isinstance(exc, MilsError):
        return False
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError):
            return False
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return True
