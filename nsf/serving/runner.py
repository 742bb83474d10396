"""One run at a time, off the server's own threads: what every server adapter needs around a :class:`Worker`.

* :class:`Runner` -- one daemon thread running submitted calls in order (the optimization blocks for seconds
  to minutes; a server's event loop or request threads must not), a ready check and a bounded queue: a
  request past ``queue_size`` waiting ones is a 503 (:class:`Unavailable`) instead of a hang;
* :func:`answer_within_budget` -- the instances of one HTTP request (a KServe v1 body, an MLflow frame) run
  inside that one request, so their estimated seconds are added up and refused together (422) before any runs.

Server-neutral: nothing here imports a server library; an adapter awaits the returned futures its own way
(``asyncio.wrap_future`` on an event loop, ``.result()`` on a request thread).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .errors import RequestError
from .worker import Outcome, Worker

# Requests a worker process holds beyond the one it runs, before it answers 503 (TorchServe's
# job_queue_size in deploy/config.properties).
QUEUE_SIZE = 8


class Unavailable(Exception):
    """503: the worker is not ready yet, or ``queue_size`` requests already wait (``body``: ``{error, field,
    allowed}``)."""

    status = 503

    def __init__(self, message: str, allowed: Any = None) -> None:
        super().__init__(message)
        self.body = {"error": message, "field": None, "allowed": allowed}


class Runner:
    """A :class:`Worker` behind one daemon thread: :meth:`submit` queues a call of ``worker.answer`` (through
    :func:`answer_within_budget`) and returns its future.

    A daemon thread, not an executor: interpreter exit does not wait for a run in progress, so a server's
    SIGTERM stops it after the server's grace period however long the run would have taken. A call whose
    future was cancelled while it waited (the server shutting down) never runs.
    """

    def __init__(self, worker: Worker | None = None, *, queue_size: int = QUEUE_SIZE, name: str = "style_fusion"):
        self.worker = worker
        self.queue_size = int(queue_size)
        self.name = name
        self.pending = 0  # calls waiting for or in a run
        self._lock = threading.Lock()
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...],
                                             dict[str, Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="nsf-runner", daemon=True).start()

    def _loop(self) -> None:
        while True:
            future, fn, args, kw = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kw))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                future.set_exception(e)

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kw)`` on the runner thread, after the calls queued before it."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((future, fn, args, kw))
        return future

    @contextlib.contextmanager
    def slot(self) -> Iterator[Worker]:
        """Hold a place in the queue while a request waits for its answer; :class:`Unavailable` when the worker
        is not ready or ``queue_size`` requests already wait."""
        worker = self.worker
        if worker is None or not worker.ready:
            raise Unavailable(f"{self.name} is not ready: the worker is loading")
        with self._lock:
            if self.pending > self.queue_size:
                raise Unavailable(f"this worker is busy: {self.pending} requests are running or waiting; retry "
                                  "later", allowed={"queue": self.queue_size})
            self.pending += 1
        try:
            yield worker
        finally:
            with self._lock:
                self.pending -= 1

    def submit(self, worker: Worker, requests: Sequence[Mapping[str, Any] | RequestError],
               **kw: Any) -> concurrent.futures.Future[list[Outcome]]:
        """``answer_within_budget(worker, requests, **kw)`` on the runner thread (``kw``: :meth:`Worker.answer`'s
        options). Take a :meth:`slot` first."""
        return self.call(answer_within_budget, worker, list(requests), **kw)


def answer_within_budget(worker: Worker, requests: Sequence[Mapping[str, Any] | RequestError],
                         **kw: Any) -> list[Outcome]:
    """``worker.answer(requests)``, the requests (one HTTP request's instances) admitted together.

    The worker admits each request on its own against its time budget; the instances of one HTTP request
    run inside that one request, so their estimated seconds are added up first: over the budget, every
    instance is refused with one 422 (``field: "instances"``) before anything runs.
    """
    cost = worker.cost
    if cost is not None and len(requests) > 1:
        total = 0.0
        for request in requests:
            if isinstance(request, RequestError):
                continue
            try:
                job = worker.check(request)
            except Exception:  # noqa: BLE001 - refused (or failed) on its own by worker.answer below
                continue
            total += worker.estimate(job)
        if total > cost.budget:
            error = RequestError(f"the {len(requests)} instances would take about {total:.0f} s together on this "
                                 f"worker, over its {cost.budget:.0f} s limit per request; send fewer per request",
                                 field="instances", status=422, allowed={"seconds_limit": round(cost.budget)})
            return [Outcome.refused(error) for _ in requests]
    return worker.answer(requests, **kw)
