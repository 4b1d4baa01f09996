"""One cost record and one report, built from manifests: the CLI summary and profile, the dataset
card's totals, the flow's artifacts and the benchmarks all read these, never counters of their own.

``Cost`` is what captioning spent: the loop's counters (``LoopStats``), the main scorer's text
encoder's (``EncoderStats``) and the shard unit's own timings. A manifest stores one shard's
``Cost`` (``as_dict``); a report adds the shards' costs up (``+``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mils_pipeline.optimize import LoopStats
from mils_pipeline.score.cache import EncoderStats


def _add(a: Any, b: Any) -> Any:
    """Field-wise sum of two counter dataclasses (numbers, and dicts of numbers)."""
    values = {}
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        values[f.name] = dict(Counter(x) + Counter(y)) if isinstance(x, dict) else x + y
    return type(a)(**values)


def _known(cls: type, data: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


_SECONDS = ("seconds_read", "seconds_decode", "seconds_write", "seconds_other")


@dataclass
class Cost:
    loop: LoopStats = field(default_factory=LoopStats)
    text_encoder: EncoderStats = field(default_factory=EncoderStats)
    seconds_read: float = 0.0  # background thread, overlapped with the loop
    seconds_decode: float = 0.0  # background thread, overlapped with the loop
    seconds_write: float = 0.0
    seconds_other: float = 0.0  # orchestration: prompts, parsing, merging, waits on the reader

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            loop=_add(self.loop, other.loop),
            text_encoder=_add(self.text_encoder, other.text_encoder),
            seconds_read=self.seconds_read + other.seconds_read,
            seconds_decode=self.seconds_decode + other.seconds_decode,
            seconds_write=self.seconds_write + other.seconds_write,
            seconds_other=self.seconds_other + other.seconds_other,
        )

    @classmethod
    def total(cls, costs: Iterable[Cost]) -> Cost:
        out = cls()
        for cost in costs:
            out = out + cost
        return out

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in _SECONDS:
            data[name] = round(data[name], 4)
        data["loop"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in data["loop"].items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Cost:
        data = data or {}
        return cls(
            loop=_known(LoopStats, data.get("loop") or {}),
            text_encoder=_known(EncoderStats, data.get("text_encoder") or {}),
            **{k: float(data.get(k) or 0.0) for k in _SECONDS},
        )

    @property
    def seconds_scoring(self) -> float:
        return self.loop.seconds_score + self.loop.seconds_media

    @property
    def seconds_reading(self) -> float:
        return self.seconds_read + self.seconds_decode


@dataclass
class ShardReport:
    """One shard of a run: what its manifest says, or why it is not done."""

    shard: str
    status: str  # "done" (this run), "skipped" (done earlier), "failed", "not done"
    rows: int = 0
    quarantined: int = 0
    mean_score: float | None = None
    mean_rounds: float | None = None
    stop_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None
    cost: Cost = field(default_factory=Cost)
    reason: str | None = None  # why a failed shard failed

    @classmethod
    def from_manifest(cls, shard: str, status: str, manifest: Mapping[str, Any] | None) -> ShardReport:
        m = manifest or {}
        return cls(
            shard=shard,
            status=status,
            rows=int(m.get("rows", 0)),
            quarantined=int(m.get("quarantined", 0)),
            mean_score=m.get("mean_score"),
            mean_rounds=m.get("mean_rounds"),
            stop_reasons=dict(m.get("stop_reasons") or {}),
            seconds=m.get("seconds"),
            cost=Cost.from_dict(m.get("cost")),
        )

    def table_row(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "status": self.status,
            "items": self.rows,
            "quarantined": self.quarantined,
            "mean_score": round(self.mean_score, 4) if self.mean_score is not None else None,
            "seconds": self.seconds,
            "reason": self.reason,
        }


@dataclass
class RunReport:
    """A run over a source: every shard it covers, this run's work and its cost."""

    output: str
    run_id: str
    shards: list[ShardReport]
    seconds: float = 0.0
    seconds_setup: float = 0.0
    hub_url: str | None = None

    def _this_run(self) -> list[ShardReport]:
        return [s for s in self.shards if s.status == "done"]

    @property
    def rows(self) -> int:
        """Rows written by this run."""
        return sum(s.rows for s in self._this_run())

    @property
    def quarantined(self) -> int:
        return sum(s.quarantined for s in self._this_run())

    @property
    def processed(self) -> int:
        return len(self._this_run())

    @property
    def skipped(self) -> int:
        return sum(s.status == "skipped" for s in self.shards)

    @property
    def failures(self) -> dict[str, str]:
        return {s.shard: s.reason or "failed" for s in self.shards if s.status == "failed"}

    @property
    def cost(self) -> Cost:
        """What this run spent (shards done earlier cost nothing now)."""
        return Cost.total(s.cost for s in self._this_run())

    def stop_reasons(self) -> dict[str, int]:
        reasons: Counter[str] = Counter()
        for shard in self._this_run():
            reasons.update(shard.stop_reasons)
        return dict(reasons)

    def mean(self, attribute: str) -> float | None:
        """A per-shard mean (``mean_score``, ``mean_rounds``) over this run's rows."""
        weighted = [(getattr(s, attribute), s.rows) for s in self._this_run() if getattr(s, attribute) is not None]
        total = sum(n for _, n in weighted)
        return sum(v * n for v, n in weighted) / total if total else None

    def time_split(self) -> dict[str, float]:
        """Where the wall time went. Decoding runs ahead in a background thread, overlapping the
        rest, so it is reported apart and is not part of the sum."""
        cost = self.cost
        split = {
            "setup (models, seed pool)": self.seconds_setup,
            "generation": cost.loop.seconds_generate,
            "scoring (texts, seed pool, media)": cost.seconds_scoring,
            "writing outputs": cost.seconds_write,
        }
        split["other (orchestration, I/O waits)"] = max(0.0, self.seconds - sum(split.values()))
        split["reading + decoding (background, overlapped)"] = cost.seconds_reading
        return split

    def summary_lines(self) -> list[str]:
        """The end-of-run summary a person reads."""
        lines = [
            f"output:        {self.output}",
            f"shards:        {len(self.shards)} ({self.skipped} already done, skipped)",
            f"items:         {self.rows} captioned, {self.quarantined} quarantined",
        ]
        mean_score, mean_rounds = self.mean("mean_score"), self.mean("mean_rounds")
        if mean_score is not None:
            lines.append(f"mean best score: {mean_score:.4f}")
        if mean_rounds is not None:
            lines.append(f"mean rounds:   {mean_rounds:.2f}  stop reasons: {self.stop_reasons()}")
        lines.append(f"wall time:     {self.seconds:.1f} s (model and seed pool setup {self.seconds_setup:.1f} s)")
        return lines

    def profile_lines(self) -> list[str]:
        """Where the time, the tokens and the text encodes went (``--profile``)."""
        wall = max(self.seconds, 1e-9)
        lines = [f"time split of {self.seconds:.1f} s:"]
        for name, seconds in self.time_split().items():
            lines.append(f"  {name:<45} {seconds:8.2f} s {100 * seconds / wall:6.1f}%")
        loop, encoder = self.cost.loop, self.cost.text_encoder
        items = max(self.rows, 1)
        lines.append(
            f"tokens:        {loop.prompt_tokens} prompt, {loop.completion_tokens} completion "
            f"({loop.completion_tokens / items:.0f} per item); useful token share {useful_share(loop):.0%}"
        )
        if loop.completion_tokens_by_round:
            lines.append(f"  useful share by round (tokens that became a new candidate): {useful_by_round(loop)}")
        if loop.cached_prompt_tokens:
            lines.append(
                f"  prefix cache: {loop.cached_prompt_tokens / max(loop.prompt_tokens, 1):.0%} of prompt tokens "
                "served from the engine's cache"
            )
        lines.append(
            f"texts:         {encoder.encoded} encoded of {encoder.requested} scored "
            f"(the rest came from the seed pool or the cache); {encoder.encoded / items:.1f} encodes per item"
        )
        return lines

    def summary(self) -> dict[str, Any]:
        """The run in plain data (a flow's return value): every shard's rows count, done earlier or now."""
        return {
            "output": self.output,
            "run_id": self.run_id,
            "shards": len(self.shards),
            "processed": self.processed,
            "skipped": self.skipped,
            "failed": len(self.failures),
            "items": sum(s.rows for s in self.shards),
            "quarantined": sum(s.quarantined for s in self.shards),
            "wall_seconds": round(self.seconds, 1),
            "hub_url": self.hub_url,
        }


def useful_by_round(loop: LoopStats) -> str:
    """``round 1: 65% of 634, round 2: ...``: each round's useful share of its completion tokens."""
    return ", ".join(
        f"round {r}: {useful_share(loop, r):.0%} of {n}"
        for r, n in sorted(loop.completion_tokens_by_round.items(), key=lambda kv: int(kv[0]))
    )


def useful_share(loop: LoopStats, round_: str | None = None) -> float:
    """Share of completion tokens that went into accepted new candidates (all rounds, or one)."""
    if round_ is None:
        return loop.useful_completion_tokens / loop.completion_tokens if loop.completion_tokens else 0.0
    total = loop.completion_tokens_by_round.get(round_, 0)
    return loop.useful_tokens_by_round.get(round_, 0.0) / total if total else 0.0


def dataset_cost(manifests: Iterable[Mapping[str, Any]]) -> Cost:
    """Total cost of every finished shard of a dataset (the card's figures)."""
    return Cost.total(Cost.from_dict(m.get("cost")) for m in manifests)
