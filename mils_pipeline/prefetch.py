"""Run an iterator ahead in a background thread, so decoding overlaps generation and scoring."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(source: Iterable[T], depth: int) -> Iterator[T]:
    """Yield ``source``'s items, produced up to ``depth`` ahead by a worker thread. An exception
    in the worker is raised here, in order, after the items produced before it."""
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in source:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer and raised there)
            put((_DONE, exc))

    worker = threading.Thread(target=work, name="mils-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)
