"""Writing the report folder: the page, its data scripts, plots, thumbnails and manifests."""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Any

import fsspec
import numpy as np
import yaml

from mils_pipeline import plots
from mils_pipeline.html_report import DEFAULT_SAMPLE
from mils_pipeline.html_report.dataset import (
    Dataset,
    best_by_round,
    choose,
    gains,
    open_dataset,
    read_bytes,
    read_quarantine,
    read_rows,
)
from mils_pipeline.html_report.media import gallery_media
from mils_pipeline.io.sink import join_url
from mils_pipeline.run.card import HISTOGRAM
from mils_pipeline.run.report import ShardReport, dataset_cost

PAGE_SIZE = 48  # gallery cards per page
CHUNK = 50  # items per details script
QUARANTINE_SHOWN = 1000
ASSETS = ("report.css", "report.js")


@dataclass
class Report:
    """Where a report went, and the figures a run's artifact shows."""

    index: str  # URL or path of index.html
    rows: int
    shown: int
    quarantined: int
    mean_score: float | None
    median_score: float | None
    mean_rounds: float | None

    def markdown(self) -> str:
        def figure(value: float | None, fmt: str) -> str:
            return "n/a" if value is None else format(value, fmt)

        return "\n".join(
            [
                f"**Report:** [{self.index}]({self.index})",
                "",
                "| items | in the gallery | quarantined | mean score | median score | mean rounds |",
                "|---|---|---|---|---|---|",
                f"| {self.rows} | {self.shown} | {self.quarantined} | {figure(self.mean_score, '.4f')} "
                f"| {figure(self.median_score, '.4f')} | {figure(self.mean_rounds, '.2f')} |",
            ]
        )


def report_location(dataset: str, out: str | None) -> str:
    """The report folder: ``out``, or ``report/`` beside the dataset's data."""
    return out or join_url(dataset, "report")


class _Folder:
    """Files written under one local directory or object-store prefix."""

    def __init__(self, url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.local = "file" in self.fs.protocol or "local" in self.fs.protocol
        self.url = url

    def write(self, name: str, data: bytes | str) -> None:
        payload = data.encode() if isinstance(data, str) else data
        path = join_url(self.root, name)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(payload)
        else:
            self.fs.pipe_file(path, payload)

    def index_url(self) -> str:
        return (
            os.path.join(os.path.abspath(self.root), "index.html") if self.local else join_url(self.url, "index.html")
        )


def _script(function: str, *arguments: Any) -> str:
    """A data script: a call of the page's code with JSON arguments (a page opened from file://
    may load scripts, but not fetch files)."""
    return f"{function}({', '.join(json.dumps(a, separators=(',', ':')) for a in arguments)});\n"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


def _gallery_items(rows: list[dict[str, Any]], media: list[Any], gain: np.ndarray) -> list[dict[str, Any]]:
    items = []
    for index, (row, shown) in enumerate(zip(rows, media, strict=True)):
        rescored = (
            {"rescore": _round(row["rescore"]), "rescoreCaption": row["rescore_caption"]} if "rescore" in row else {}
        )
        items.append(
            {
                **rescored,
                "key": row["key"],
                "shard": row["source_shard"],
                "caption": row["caption"],
                "score": _round(row["score"]),
                "gain": _round(float(gain[index])),
                "rounds": row["rounds"],
                "stop": row["stop_reason"],
                "pictures": [name for name, _ in shown.pictures],
                "sound": shown.sound[0] if shown.sound else None,
                "missing": shown.missing,
            }
        )
    return items


def _details(row: dict[str, Any], index: int) -> dict[str, Any]:
    names = [s["name"] for s in row.get("scorers") or []]
    return {
        "scorers": names,
        "trajectory": f"trajectories/{index}.svg",
        "candidates": [
            {
                "text": c["text"],
                "score": _round(c["score"]),
                "round": c["round"],
                "operator": c.get("operator"),
                "components": [_round(x["score"]) for x in c.get("components") or []],
                **({"rescore": _round(c["rescore"])} if "rescore" in c else {}),
            }
            for c in row["candidates"] or []
        ],
    }


def _plots(dataset: Dataset) -> dict[str, bytes]:
    overview = dataset.overview
    scores = overview.column("score").to_numpy(zero_copy_only=False).astype(float)
    rounds = Counter(overview.column("rounds").to_pylist())
    cost = overview.column("cost").to_pylist()
    seconds = [sum(r["gpu_seconds"] or 0.0 for r in t) for t in overview.column("trajectory").to_pylist()]
    return {
        "score_histogram.svg": plots.score_histogram(scores),
        "best_score_by_round.svg": plots.best_score_by_round(best_by_round(overview)),
        "stop_reasons.svg": plots.counts_bar(
            dict(sorted(Counter(overview.column("stop_reason").to_pylist()).items())), "Stop reasons", "stop reason"
        ),
        "rounds_used.svg": plots.counts_bar(
            {str(k): rounds[k] for k in sorted(rounds)}, "Rounds used", "rounds until the item stopped"
        ),
        "cost_per_item.svg": plots.cost_per_item(
            {
                "LLM tokens (prompt + completion)": np.array(
                    [(c or {}).get("prompt_tokens", 0) + (c or {}).get("completion_tokens", 0) for c in cost], float
                ),
                "texts encoded": np.array([(c or {}).get("texts_encoded", 0) for c in cost], float),
                "priced GPU seconds": np.array(seconds, float),
            }
        ),
    }


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _rescore_html(dataset: Dataset) -> str:
    """A rescored dataset's two scorers and how they agree (empty for a plain caption run)."""
    if not dataset.rescored:
        return ""
    from mils_pipeline.rescore import agreement

    figures = agreement(dataset.overview)
    rescore = next((m["rescore"] for m in dataset.manifests.values() if "rescore" in m), {})
    scorer, parent = rescore.get("scorer") or {}, rescore.get("parent") or {}
    first = next(iter(dataset.manifests.values()), {})
    run_scorer = first.get("scorer") or {}

    def figure(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    return "\n".join(
        [
            '<section id="rescore">',
            "  <h2>Two scorers</h2>",
            f"  <p>Rescored by <code>{_e(scorer.get('model'))}</code> ({_e(scorer.get('revision'))}); the run's "
            f"scorer was <code>{_e(run_scorer.get('model'))}</code>. Parent dataset <code>{_e(parent.get('dataset'))}"
            f"</code> (config <code>{_e(str(parent.get('config_sha256'))[:12])}</code>, run "
            f"<code>{_e(parent.get('run_id'))}</code>).</p>",
            '  <table class="data" id="agreement">',
            "    <thead><tr><th>items</th><th>rank correlation of item scores</th><th>rank correlation of each "
            "item's candidates (mean)</th><th>best caption changed</th><th>mean score</th><th>mean rescore</th>"
            "</tr></thead>",
            f"    <tbody><tr><td>{figures['items']}</td><td>{figure(figures['item_rank_correlation'], '.3f')}</td>"
            f"<td>{figure(figures['candidate_rank_correlation'], '.3f')}</td>"
            f"<td>{figures['best_caption_changed']} ({figure(figures['best_caption_changed_share'], '.1%')})</td>"
            f"<td>{figure(figures['mean_score'], '.4f')}</td><td>{figure(figures['mean_rescore'], '.4f')}</td>"
            "</tr></tbody>",
            "  </table>",
            '  <p class="note">Each card shows both scores; where the new scorer ranks another kept candidate '
            "first, the card shows it too.</p>",
            "</section>",
        ]
    )


def _card_html(card: str | None, manifests: list[dict[str, Any]]) -> str:
    """The dataset card as written beside the data (its models, settings and config hash), or the
    manifests' models when the dataset has no card yet."""
    if card is None:
        first = manifests[0] if manifests else {}
        lines = [
            "<p>This dataset has no card (README.md) yet: a run writes it when it finishes.</p><ul>",
            *(
                f"<li>{role}: <code>{_e((first.get(role) or {}).get('model'))}</code> "
                f"({_e((first.get(role) or {}).get('revision'))})</li>"
                for role in ("generator", "scorer")
            ),
            f"<li>config sha256: <code>{_e(first.get('config_sha256'))}</code></li></ul>",
        ]
        return "\n".join(lines)
    from markdown_it import MarkdownIt

    header, body = "", card
    if card.startswith("---"):
        _, header, body = card.split("---", 2)
    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    facts = yaml.safe_load(header) or {}
    facts.pop("configs", None)
    shown = yaml.safe_dump(facts, sort_keys=False)
    return f"<details><summary>Card header (YAML)</summary><pre>{_e(shown)}</pre></details>\n{renderer.render(body)}"


def _shards_html(dataset: Dataset) -> str:
    rows = []
    for name, manifest in sorted(dataset.manifests.items()):
        row = ShardReport.from_manifest(name, str(manifest.get("status", "done")), manifest).table_row()
        source = (manifest.get("input") or {}).get("url", "")
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{row['items']}</td><td>{row['quarantined']}</td>"
            f"<td>{_e(row['mean_score'])}</td><td>{_e(row['seconds'])}</td><td>{_e(source)}</td>"
            f'<td><a href="manifests/{_e(name)}.json">manifest</a></td></tr>'
        )
    return "\n".join(rows)


def _quarantine_html(rows: list[dict[str, Any]], manifests: dict[str, Any]) -> str:
    out = []
    for r in rows:
        shard = r["source_shard"]
        link = f'<a href="manifests/{_e(shard)}.json">{_e(shard)}</a>' if shard in manifests else _e(shard)
        out.append(
            f"<tr><td>{link}</td><td>{_e(r['key'])}</td><td>{_e(r['member'])}</td>"
            f"<td>{_e(r['error_type'])}</td><td>{_e(r['message'])}</td></tr>"
        )
    return "\n".join(out)


def _index_html(
    dataset: Dataset, shown: int, sort: str, sample: int, quarantine: tuple[list[dict[str, Any]], int], card: str
) -> str:
    q_rows, q_total = quarantine
    cost = dataset_cost(dataset.manifests.values())
    sampled = (
        f"all {shown} items"
        if shown == dataset.rows
        else f"{shown} of {dataset.rows} items, evenly spaced in {sort} order (--sample {sample})"
    )
    more = f" (the first {len(q_rows)} shown)" if q_total > len(q_rows) else ""
    template = resources.files("mils_pipeline.html_report").joinpath("assets", "index.html").read_text()
    return template.format(
        title=_e(f"mils report: {dataset.url}"),
        dataset=_e(dataset.url),
        rows=dataset.rows,
        shards=len(dataset.manifests),
        quarantined=q_total,
        modality=_e(dataset.modality),
        sampled=_e(sampled),
        sort=_e(sort),
        generated=_e(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
        tokens=cost.loop.prompt_tokens + cost.loop.completion_tokens,
        encoded=cost.text_encoder.encoded,
        shard_rows=_shards_html(dataset),
        quarantine_rows=_quarantine_html(q_rows, dataset.manifests),
        quarantine_more=_e(more),
        rescore=_rescore_html(dataset),
        card=card,
    )


def write_report(dataset_url: str, out: str | None = None, sample: int = DEFAULT_SAMPLE, sort: str = "score") -> Report:
    """Write the HTML report of the dataset at ``dataset_url`` into ``out`` (default: ``report/``
    beside the data); returns where its index.html is and the headline figures."""
    dataset = open_dataset(dataset_url)
    folder = _Folder(report_location(dataset_url, out))
    chosen = choose(dataset.overview, sort, sample)
    rows = read_rows(dataset, chosen)
    media = gallery_media(rows, dataset.manifests, dataset.media_column)
    gain = gains(dataset.overview)[chosen] if chosen.size else np.zeros(0)

    for name in ASSETS:
        folder.write(
            f"assets/{name}", resources.files("mils_pipeline.html_report").joinpath("assets", name).read_bytes()
        )
    for shown in media:
        for name, data in [*shown.pictures, *([shown.sound] if shown.sound else [])]:
            folder.write(name, data)
    charts = plots.TrajectoryCharts()
    try:
        for index, row in enumerate(rows):
            trajectory = row["trajectory"] or []
            folder.write(
                f"trajectories/{index}.svg",
                charts.draw(
                    [r["round"] for r in trajectory],
                    [r["best_score"] for r in trajectory],
                    [r["mean_top_k"] for r in trajectory],
                ),
            )
    finally:
        charts.close()
    for start in range(0, len(rows), CHUNK):
        details = [_details(row, start + i) for i, row in enumerate(rows[start : start + CHUNK])]
        folder.write(f"data/items-{start // CHUNK}.js", _script("MILS.details", start // CHUNK, details))
    gallery = {
        "modality": dataset.modality,
        "rows": dataset.rows,
        "sort": sort,
        "pageSize": PAGE_SIZE,
        "chunk": CHUNK,
        "items": _gallery_items(rows, media, gain),
    }
    folder.write("data/gallery.js", _script("MILS.gallery", gallery))
    for name, svg in _plots(dataset).items():
        folder.write(f"plots/{name}", svg)
    for name, manifest in dataset.manifests.items():
        folder.write(f"manifests/{name}.json", json.dumps(manifest, indent=2, sort_keys=True))
    card_text = read_bytes(dataset_url, "README.md")
    histogram = read_bytes(dataset_url, HISTOGRAM)
    if histogram is not None:
        folder.write(HISTOGRAM, histogram)  # the card's own image, so the card shows whole here
    card = _card_html(
        card_text.decode("utf-8", errors="replace") if card_text else None, list(dataset.manifests.values())
    )
    quarantine = read_quarantine(dataset_url, QUARANTINE_SHOWN)
    folder.write("index.html", _index_html(dataset, len(rows), sort, sample, quarantine, card))  # last: whole report

    scores = dataset.overview.column("score").to_numpy(zero_copy_only=False).astype(float)
    rounds = dataset.overview.column("rounds").to_numpy(zero_copy_only=False).astype(float)
    return Report(
        index=folder.index_url(),
        rows=dataset.rows,
        shown=len(rows),
        quarantined=quarantine[1],
        mean_score=float(scores.mean()) if scores.size else None,
        median_score=float(np.median(scores)) if scores.size else None,
        mean_rounds=float(rounds.mean()) if rounds.size else None,
    )
