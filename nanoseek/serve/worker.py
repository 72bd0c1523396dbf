"""The engine's worker and the jobs of HTTP requests.

One worker owns the engine: it admits new sequences between steps, runs a step, and hands each token to
the request that waits for it. `nanoseek serve` runs it in the main thread and the HTTP side in another:
torch's OpenMP threads belong to the thread that first ran parallel work (loading, compiling), and a second
thread running kernels makes a second team, which libgomp then wakes slowly (7.7-8.7x slower decoding on 2
cores). The HTTP side reserves engine slots before it queues work (`admit`), so a request that finds every
slot taken gets 429 at once, and one that could never fit gets 400. A request that fails, or whose client
leaves, hands back its slots (`Job.close`).
"""

import asyncio
import queue
import threading

from nanoseek.engine import Engine
from nanoseek.serve.schemas import APIError, ClientGone, api_error


class Job:
    """Sequences of one HTTP request: the worker pushes ("admitted", None), then (index, Event) into
    `events` (every event when streaming, else only the last of each sequence: each push wakes the event
    loop, which then competes with decoding for the cores), or ("error", exception). `close` hands back what
    the request took, once, however it ends."""

    def __init__(self, prompts, params, loop, worker, stream):
        self.prompts, self.params, self.loop, self.worker, self.stream = prompts, params, loop, worker, stream
        self.events: asyncio.Queue = asyncio.Queue()
        self.seq_ids: list[int] = []
        self.closed = False

    def push(self, item):
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def close(self):
        if not self.closed:
            self.closed = True
            self.worker.cancel(self)
            self.worker.release(len(self.prompts))


class Worker:
    def __init__(self, engine: Engine, thread=True):
        """thread: run in a thread of its own, started here; else the caller runs `run` where it likes."""
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.reserved = 0
        self.lock = threading.Lock()
        self.jobs: dict[int, tuple[Job, int]] = {}  # sequence id -> (job, index in job)
        if thread:
            threading.Thread(target=self.run, daemon=True, name="nanoseek-engine").start()

    def reserve(self, n):
        with self.lock:
            if self.reserved + n > self.engine.max_batch:
                return False
            self.reserved += n
            return True

    def release(self, n):
        with self.lock:
            self.reserved -= n

    def submit(self, job):
        self.inbox.put(("add", job))

    def cancel(self, job):
        self.inbox.put(("abort", job))

    @property
    def load(self):
        return {"running": len(self.engine.running), "reserved": self.reserved, "free": len(self.engine.free),
                "slots": self.engine.max_batch}

    def run(self, running=lambda: True):
        """Admit, abort and step, for as long as running() (checked at least every second while idle)."""
        while running():
            try:
                kind, job = self.inbox.get(timeout=1.0 if self.engine.idle else 0)
            except queue.Empty:
                if self.engine.idle:
                    continue
                kind = None
            if kind == "add":
                try:
                    seqs = self.engine.add(job.prompts, job.params)  # all or nothing
                except Exception as e:  # the request learns why; the engine goes on
                    job.push(("error", e))
                    continue
                for i, seq in enumerate(seqs):
                    job.seq_ids.append(seq.id)
                    self.jobs[seq.id] = (job, i)
                job.push(("admitted", None))
                continue
            if kind == "abort":
                for sid in job.seq_ids:
                    self.engine.abort(sid)
                    self.jobs.pop(sid, None)
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving the next ones
                for sid, (job, _) in list(self.jobs.items()):
                    job.push(("error", RuntimeError(f"generation failed: {e}")))
                    self.engine.abort(sid)
                self.jobs.clear()
                continue
            for event in events:
                job, index = self.jobs.get(event.seq.id, (None, None))
                if job is not None and (job.stream or event.finished):
                    job.push((index, event))
                if event.finished:
                    self.jobs.pop(event.seq.id, None)


async def admit(request, worker: Worker, prompts, params, stream):
    """Reserve slots, queue the job and wait until the engine has admitted it; on any failure, what was
    taken is handed back before the error goes out."""
    n, slots = len(prompts), worker.engine.max_batch
    if n > slots:
        raise APIError(400, f"this request needs {n} sequences (n times the prompts) but the server decodes at "
                            f"most {slots} at once; lower n or send fewer prompts", param="n")
    if not worker.reserve(n):
        raise APIError(429, f"the server is at capacity ({slots} sequences); retry shortly",
                       "rate_limit_error", code="server_busy")
    job = Job(prompts, params, asyncio.get_running_loop(), worker, stream)
    worker.submit(job)
    try:
        kind, error = await next_event(request, job)
    except BaseException:
        job.close()
        raise
    if kind == "error":
        job.close()
        raise api_error(error)
    return job


async def next_event(request, job):
    """The next worker event; raises ClientGone once the client has gone. Streaming responses pass
    request=None: there Starlette itself cancels the generator when the client disconnects."""
    if request is None:
        return await job.events.get()
    while not await request.is_disconnected():  # checked before every event: they may never pause
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            pass
    raise ClientGone()


async def collect(request, job):
    finals = [None] * len(job.prompts)
    while any(f is None for f in finals):
        index, event = await next_event(request, job)
        if index == "error":
            raise api_error(event)
        if event.finished:
            finals[index] = event.seq
    return finals
