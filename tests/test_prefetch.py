import threading
import time

import pytest

from mils_pipeline.prefetch import prefetch


def test_items_arrive_in_order_from_a_background_thread():
    threads = []

    def source():
        for i in range(50):
            threads.append(threading.current_thread().name)
            yield i

    assert list(prefetch(source(), depth=4)) == list(range(50))
    assert set(threads) == {"mils-prefetch"}


def test_an_error_in_the_source_is_raised_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for item in prefetch(source(), depth=1):
            got.append(item)
    assert got == [1, 2]


def test_closing_early_stops_the_worker():
    produced = []

    def source():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = prefetch(source(), depth=2)
    assert next(stream) == 0
    stream.close()  # joins the worker
    count = len(produced)
    time.sleep(0.3)
    assert count < 10 and len(produced) == count
