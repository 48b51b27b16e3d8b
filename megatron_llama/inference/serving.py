"""One generation at a time for the server, on every tensor rank: rank 0 queues requests and runs them on a worker
thread; with tensor parallelism it broadcasts each job, and once per step whether to go on, to the other ranks,
which follow in `follow()`. Requests are queued, never mixed: a request's prompts form one batch. A job is checked
on the leader before it is broadcast (submit raises ValueError); a job that fails all the same fails on every rank
alike (the same job, the same step), and every rank goes on to the next one: no request can stop a rank.

    engine = ServingEngine(generator)
    if engine.is_leader:
        engine.start()                                   # the worker thread
        engine.submit(job, on_event, cancelled)          # from the HTTP server; events arrive on the worker thread
        engine.shutdown()                                # tells the followers to return, joins the worker
    else:
        engine.follow()                                  # until the leader shuts down
"""
from __future__ import annotations

import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

from megatron_llama.inference.generator import Completion, Delta, Generator
from megatron_llama.inference.sampling import SamplingParams
from megatron_llama.parallel import comm, state


@dataclass(frozen=True)
class Job:
    """What every tensor rank needs to run one request (checked on the leader before it is broadcast)."""

    prompts: list[list[int]]
    max_new_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Finished:
    """The last event of a job: its completions, or the error that ended it."""

    completions: list[Completion] | None
    error: Exception | None = None


class ServingEngine:
    def __init__(self, generator: Generator):
        self.generator = generator
        layout = state.current_layout()
        self.group, self.leader_rank = layout.tensor_group, layout.tensor_ranks[0]
        self.is_leader = layout.tensor_rank == 0
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._lead, name="generation", daemon=True)

    def start(self) -> None:
        self._worker.start()

    def submit(self, job: Job, on_event: Callable[[list[Delta] | Finished], None], cancelled: threading.Event) -> None:
        """Queue `job`; on_event gets each step's deltas, then a Finished. Setting `cancelled` ends it early."""
        self.generator.check_request(job.prompts, job.max_new_tokens)
        job.sampling.check()
        self._jobs.put((job, on_event, cancelled))

    def shutdown(self) -> None:
        self._jobs.put(None)
        if self._worker.is_alive():
            self._worker.join()

    def _broadcast(self, value):
        return comm.broadcast_object(value, self.leader_rank, self.group)

    def _lead(self) -> None:
        while True:
            item = self._jobs.get()
            self._broadcast(None if item is None else item[0])
            if item is None:
                return
            job, on_event, cancelled = item
            try:
                generation = self._start(job, lambda: self._broadcast(not cancelled.is_set()))
                for deltas in generation:
                    on_event(deltas)
                on_event(Finished(generation.completions))
            except Exception as error:  # noqa: BLE001 - the request fails, the server keeps serving
                on_event(Finished(None, error))

    def follow(self) -> None:
        """Run the leader's jobs until it shuts down (tensor ranks other than 0)."""
        while True:
            job = self._broadcast(None)
            if job is None:
                return
            try:
                for _ in self._start(job, lambda: self._broadcast(None)):
                    pass
            except Exception as error:  # noqa: BLE001 - the leader's copy of the job failed too; the next one runs
                print(f"chat_server: tensor rank {state.current_layout().tensor_rank}: a request failed: {error}",
                      file=sys.stderr, flush=True)

    def _start(self, job: Job, keep_going: Callable[[], bool]):
        return self.generator.start(job.prompts, job.max_new_tokens, job.sampling, job.stop, keep_going)
