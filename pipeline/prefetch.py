"""Items of an iterable computed ahead in a background thread, so that reads overlap compute.

One helper for every read-ahead of the pipeline (the training loader's batches, the
examples scan's stored sequences). File reads and most torch and numpy kernels release
the GIL, so the producer thread runs while the consumer computes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.1
"""How often a producer blocked on a full queue checks whether the consumer has stopped."""


class _Done:
    """Queued after the last item."""


class _Failed:
    """Queued when the producer raised: the exception, re-raised in the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """The items of `items`, produced in a daemon thread up to `depth` ahead of the consumer.

    `iter(items)` is called, and every item computed, in the thread, so a generator's work
    happens there. An exception of the producer is re-raised in the consumer, at the item
    it would have given. When the consumer stops early (it breaks, raises, or closes this
    generator), the producer stops at its next item: it never blocks on the full queue
    forever, since it only waits on the queue while checking, every `_POLL_SECONDS`, that
    the consumer is still there; the consumer waits for the thread to end before it goes on.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        """Queue `item` unless the consumer has stopped; whether it was queued."""
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_Done())
        except BaseException as e:  # re-raised in the consumer
            put(_Failed(e))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while not isinstance(item := q.get(), _Done):
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
