"""Progress bars for long steps, one per named step (tqdm on stderr)."""

from __future__ import annotations

import sys


class ProgressBars:
    """A ``Progress`` callable: ``bars(what, advance, total)`` advances the bar named ``what``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bars: dict[str, object] = {}

    def __call__(self, what: str, advance: int, total: int | None) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        bar = self._bars.get(what)
        if bar is None:
            unit = "text" if "seed" in what else "item"
            bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True)
            self._bars[what] = bar
        bar.update(advance)
        if total is not None and bar.n >= total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
