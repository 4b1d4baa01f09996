"""`mils report`: a dataset as a static HTML report folder a person opens in a browser.

One folder, no server, no network: ``index.html`` with the gallery (thumbnails, final caption,
score, rounds, stop reason; an item's candidates and trajectory on click), the dataset's plots
(matplotlib SVG), the shards and the quarantine with their manifests, and the dataset card. The
gallery's data sit in small script files (``data/``) loaded as pages are opened, so the page stays
light however many items the gallery holds; past ``sample`` items it shows an evenly spaced sample
(see ``dataset.choose``). It reads local and object-store datasets alike and writes its folder
to either.
"""

from __future__ import annotations

from typing import Any

SORTS = ("score", "gain", "rounds", "key")  # gallery orders: best first for all but key
DEFAULT_SAMPLE = 500  # items in the gallery unless asked otherwise
_LAZY = {"Report": "page", "report_location": "page", "write_report": "page", "ReportError": "dataset"}


def __getattr__(name: str) -> Any:
    """The report's code loads on first use: `mils --help` and the other commands need only the
    constants above (pyarrow and the run's modules take a while to import)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = ["DEFAULT_SAMPLE", "SORTS", "Report", "ReportError", "report_location", "write_report"]
