"""How a job's conversations with a teacher run: one after another, N at once on threads, or in batches.

A conversation (`builder.conversation`) is a generator: it yields each request for the
teacher, is sent the teacher's `Proposal` (or thrown its `TeacherError`) and returns its outcome.
Rejection sampling lives there once; this module only decides who asks the teacher, and when:

- `threaded`: up to N conversations at once, each asking `teacher.propose` on its own thread. The
  work of an HTTP teacher is waiting for answers, so threads suffice (and the GIL is released
  while waiting).
- `batched`: up to B conversations in lockstep; each round, every open conversation's next request
  goes to the teacher in one `propose_many` call (a local model generates for the whole batch).

Both take jobs lazily and hand back lists of ``(job, outcome)``: the conversations that finished
since the last list, in the order they finished, in the caller's thread, so one writer appends
every result (and may commit a list's lines with one fsync). New jobs are taken only after the
caller has handled the list before, so with one in flight a job runs exactly as a plain loop does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

from tag_lightning.traces.teachers import Proposal, TeacherError, TeacherRequest

Job = TypeVar("Job")
Dialogue = Generator[TeacherRequest, Proposal, Any]


def reply(dialogue: Dialogue, answer: Proposal | TeacherError) -> tuple[bool, Any]:
    """Give a conversation the teacher's answer: ``(False, next request)`` or ``(True, outcome)``."""
    try:
        if isinstance(answer, TeacherError):
            return False, dialogue.throw(answer)
        return False, dialogue.send(answer)
    except StopIteration as finished:
        return True, finished.value


def converse(dialogue: Dialogue, propose: Callable[[TeacherRequest], Proposal]) -> Any:
    """Run one conversation to its end, asking `propose`; the outcome."""
    finished, step = False, next(dialogue)
    while not finished:
        try:
            answer = propose(step)
        except TeacherError as err:
            answer = err
        finished, step = reply(dialogue, answer)
    return step


def threaded(
    jobs: Iterator[Job], start: Callable[[Job], Dialogue], propose: Callable[[TeacherRequest], Proposal], size: int
) -> Iterator[list[tuple[Job, Any]]]:
    """Up to `size` conversations at once, each on its own thread (see the module doc)."""
    workers = _Workers(size)
    try:
        while True:
            while workers.running < size and (job := next(jobs, None)) is not None:
                workers.submit(job, lambda job=job: converse(start(job), propose))
            if not workers.running:
                return
            yield workers.finished()
    finally:
        workers.close()


def batched(
    jobs: Iterator[Job], start: Callable[[Job], Dialogue],
    propose_many: Callable[[list[TeacherRequest]], list[Proposal]], size: int,
) -> Iterator[list[tuple[Job, Any]]]:
    """Up to `size` conversations in lockstep, their requests answered by one `propose_many` call per round.

    A `TeacherError` of the call is every request's answer (a batch fails as a whole).
    """
    open_: list[tuple[Job, Dialogue, TeacherRequest]] = []
    while True:
        while len(open_) < size and (job := next(jobs, None)) is not None:
            dialogue = start(job)
            open_.append((job, dialogue, next(dialogue)))
        if not open_:
            return
        try:
            answers: list[Proposal | TeacherError] = list(propose_many([request for _, _, request in open_]))
        except TeacherError as err:
            answers = [err] * len(open_)
        stepped = [(job, dialogue, reply(dialogue, answer)) for (job, dialogue, _), answer in zip(open_, answers)]
        open_ = [(job, dialogue, step) for job, dialogue, (finished, step) in stepped if not finished]
        if done := [(job, outcome) for job, _, (finished, outcome) in stepped if finished]:
            yield done


class _Workers:
    """Calls run on daemon threads; their results come back in the order they finish.

    Daemon threads rather than a `ThreadPoolExecutor`: the interpreter joins an executor's threads
    at exit, so a job stopped by an error or Ctrl-C would first wait out every request in flight
    and its backoff. Calls still running when the job stops are abandoned: nothing of theirs was
    written, so a rerun asks for them again.
    """

    def __init__(self, size: int):
        self._todo: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._size = size
        self.running = 0
        for _ in range(size):
            threading.Thread(target=self._serve, name="teacher", daemon=True).start()

    def submit(self, job: Any, call: Callable[[], Any]) -> None:
        self._todo.put((job, call))
        self.running += 1

    def finished(self) -> list[tuple[Any, Any]]:
        """Every finished ``(job, result)``, waiting for one if none is; a call's exception is raised
        here, in the caller's thread."""
        done = [self._done.get()]
        while not self._done.empty():
            done.append(self._done.get())
        self.running -= len(done)
        for _, _, error in done:
            if error is not None:
                raise error
        return [(job, result) for job, result, _ in done]

    def close(self) -> None:
        """Idle threads end now, busy ones after their call (with the process, if it ends first)."""
        for _ in range(self._size):
            self._todo.put(None)

    def _serve(self) -> None:
        while (item := self._todo.get()) is not None:
            job, call = item
            try:
                self._done.put((job, call(), None))
            except BaseException as err:  # handed to the caller's thread, which decides
                self._done.put((job, None, err))
