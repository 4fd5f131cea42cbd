"""The serving engine: one thread running a :class:`~loraq.generation.decode.DecodeBatch` forever.

Each turn of the loop either admits waiting requests (prefilling them together, whatever their
adapters) or runs one decode step for every running row; then it hands each row's new text to
its request and drops finished or abandoned rows. Requests wait in a bounded queue: a full
queue is the HTTP layer's 429. An exception while prefilling a group is retried request by
request, so only the request that caused it fails; the engine keeps serving the rest.
A reply's text is decoded as its tokens arrive and cut at its stop strings by
:class:`~loraq.generation.text.ReplyText`, the same code ``loraq.generate`` uses.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..generation.decode import DecodeBatch, SamplingParams, SequenceState
from ..generation.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache
from ..generation.text import ReplyText
from .metrics import ServerMetrics
from .registry import AdapterRegistry, ServeError

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One sequence to generate, and where its events go.

    ``emit`` receives dicts: ``{"type": "text", "text": delta}`` as text becomes final,
    then ``{"type": "done", "finish_reason": ..., "prompt_tokens": n, "completion_tokens": m}``
    or ``{"type": "error", "status": code, "message": ...}``. It is called from the engine thread.
    """

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[dict[str, Any]], None]
    stops: tuple[str, ...] = ()
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    seq: SequenceState | None = None
    reply: ReplyText | None = None  # the text of seq.generated, built token by token
    last_token_at: float | None = None
    ended: bool = False  # set once its end is counted (done, error or cancelled)

    def cancel(self) -> None:
        """Abandon the request (client gone): its row leaves the batch at the next step."""
        self.cancelled = True


class Engine:
    """Continuous batching over a model with per-row adapters (see the module doc)."""

    def __init__(
        self,
        registry: AdapterRegistry,
        tokenizer,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        metrics: ServerMetrics | None = None,
        prefix_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.registry = registry
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        # one set of metrics for the engine and the registry (its LRU loads and evictions)
        self.metrics = registry.metrics if metrics is None else metrics
        registry.metrics = self.metrics
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._waiting: list[Request] = []  # admitted from the queue, adapter slot not yet free
        self._running: dict[int, Request] = {}
        pad = tokenizer.pad_token_id
        pad = tokenizer.eos_token_id if pad is None else pad
        # prompts that begin as a recent one (a shared system prompt) reuse its keys and values
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self._prefix_counts = (0, 0)  # (hits, reused tokens) already counted in the metrics
        self._batch = DecodeBatch(
            registry.model,
            0 if pad is None else pad,
            prefix_cache=self.prefix_cache,
            adapter_pool=registry.pool,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loraq-engine", daemon=True)

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Start the engine thread."""
        self.registry.model.eval()
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue ``request``, reserving its adapter until it ends (an adapter's DELETE waits for
        it); a full queue raises a 429 :class:`ServeError` with Retry-After."""
        if self._stop.is_set():
            raise ServeError(503, "the server is shutting down")
        if not request.prompt_ids:
            raise ServeError(400, "the prompt is empty (0 tokens)", "prompt")
        self.registry.reserve(request.adapter)
        # its folder is read and parsed on a worker while it waits, not by the engine thread
        self.registry.prefetch(request.adapter)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            self.registry.unreserve(request.adapter)
            raise ServeError(
                429, "the request queue is full; retry shortly", headers={"Retry-After": "1"}
            ) from None
        self.metrics.queue_depth.set(self._queue.qsize())

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued and running request, then stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.registry.close()

    @property
    def alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread.is_alive()

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            idle = not self._running and not self._waiting
            if idle and self._stop.is_set() and self._queue.empty():
                return
            joining = self._admit(block=idle)
            try:
                with self.registry.model_lock:
                    if joining:
                        self._prefill(joining)
                    elif self._running:
                        self._decode()
            except Exception as err:  # a failed decode step fails the rows it ran
                message = f"generation failed: {type(err).__name__}: {err}"
                for req in list(self._running.values()):
                    self._fail(req, 500, message)
                for req in joining:  # a prefill that failed before its rows joined
                    if not req.ended and req.id not in self._running:
                        self.registry.release(req.adapter)
                        self._reply_error(req, 500, message)
            self._deliver()

    def _admit(self, block: bool) -> list[Request]:
        candidates, self._waiting = self._waiting, []
        room = self.max_batch - len(self._running)
        while len(candidates) < room:
            try:
                timeout = 0.05 if block and not candidates else None
                req = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
            except queue.Empty:
                break
            candidates.append(req)
        self.metrics.queue_depth.set(self._queue.qsize() + len(self._waiting))
        joining, slot_wanted, reading = [], False, []
        for req in candidates:
            if req.cancelled:
                self._finish_metrics(req, "cancelled")
                continue
            if not self.registry.is_ready(req.adapter):
                # its folder is still being read: the running rows keep decoding meanwhile,
                # and it takes no slot, so the requests behind it are not held up
                self.registry.prefetch(req.adapter)
                reading.append(req.adapter)
                self._waiting.append(req)
                continue
            if slot_wanted and req.adapter is not None:
                # first come, first served: an earlier request waits for an adapter slot, so
                # later ones let the resident adapters drain instead of starving it
                self._waiting.append(req)
                continue
            try:
                held = self.registry.acquire(req.adapter)
            except ServeError as err:
                self._reply_error(req, err.status, err.message)
                continue
            except Exception as err:  # an unforeseen load failure fails this request only
                message = f"adapter {req.adapter!r} failed to load: {type(err).__name__}: {err}"
                self._reply_error(req, 500, message)
                continue
            if held and len(joining) < room:
                joining.append(req)
            else:
                if held:
                    self.registry.release(req.adapter)
                slot_wanted = slot_wanted or not held
                self._waiting.append(req)
        if reading and not joining and not self._running:
            self.registry.wait_for_reads(reading, 0.05)  # nothing to decode: no busy loop
        return joining

    def _prefill(self, joining: list[Request]) -> None:
        ready = []
        for req in joining:
            try:
                req.seq = SequenceState(list(req.prompt_ids), req.adapter, req.params)
                req.reply = ReplyText(self.tokenizer, req.stops)
            except Exception as err:  # fails this request only
                req.seq = None
                self.registry.release(req.adapter)
                self._reply_error(req, 500, f"prefill failed: {type(err).__name__}: {err}")
                continue
            ready.append(req)
        joining = ready
        if not joining:
            return
        groups = [joining]
        try:
            self._batch.add([r.seq for r in joining])
        except Exception:
            groups = [[r] for r in joining]  # find the one that fails; serve the others
            for req in joining:
                try:
                    self._batch.add([req.seq])
                except Exception as err:
                    self._reply_error(req, 500, f"prefill failed: {type(err).__name__}: {err}")
                    self.registry.release(req.adapter)
                    req.seq = None
        for group in groups:
            for req in group:
                if req.seq is not None:
                    self._running[req.id] = req
                    self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self.metrics.batch_size.observe(len(joining))
        if self.prefix_cache is not None:
            hits, reused = self.prefix_cache.hits, self.prefix_cache.reused_tokens
            self.metrics.prefix_hits.inc(hits - self._prefix_counts[0])
            self.metrics.prefix_reused_tokens.inc(reused - self._prefix_counts[1])
            self._prefix_counts = (hits, reused)

    def _decode(self) -> None:
        self._batch.step()
        self.metrics.batch_size.observe(len(self._batch))

    # ------------------------------------------------------------------ results
    def _deliver(self) -> None:
        now = time.perf_counter()
        done = []
        for req in list(self._running.values()):
            seq = req.seq
            if req.cancelled:
                seq.stop("cancelled")
            elif len(seq.generated) > req.reply.consumed:
                self._on_token(req, now)
            if seq.finished:
                done.append(req)
        if done:
            self._batch.remove([r.seq for r in done])
            for req in done:
                self._finish(req)
        self.metrics.running.set(len(self._running))
        self.metrics.adapters.set(len(self.registry.resident()))

    def _on_token(self, req: Request, now: float) -> None:
        seq = req.seq
        if req.last_token_at is None:
            self.metrics.ttft.observe(now - req.created)
        else:
            self.metrics.inter_token.observe(now - req.last_token_at)
        req.last_token_at = now
        self.metrics.generated_tokens.inc()
        reply = req.reply
        reply.add(seq.generated[reply.consumed :])
        if reply.stopped:
            seq.stop("stop")
        elif seq.finished:
            reply.finish()
        self._emit_text(req)

    def _emit_text(self, req: Request) -> None:
        piece = req.reply.take()
        if piece:
            req.emit({"type": "text", "text": piece})

    def _finish(self, req: Request) -> None:
        self._running.pop(req.id, None)
        self.registry.release(req.adapter)
        seq = req.seq
        if seq.finish_reason == "cancelled":
            self._finish_metrics(req, "cancelled")
            return
        req.reply.finish()  # e.g. at EOS: text held back for a stop string that never came
        self._emit_text(req)
        req.emit(
            {
                "type": "done",
                "finish_reason": seq.finish_reason,
                "prompt_tokens": len(req.prompt_ids),
                "completion_tokens": len(seq.generated),
                "sequence": seq,  # its tokens and log-probabilities, for logprobs replies
            }
        )
        self._finish_metrics(req, "ok")

    def _fail(self, req: Request, status: int, message: str) -> None:
        self._running.pop(req.id, None)
        if req.seq is not None:
            self._batch.remove([req.seq])
        self.registry.release(req.adapter)
        self._reply_error(req, status, message)

    def _reply_error(self, req: Request, status: int, message: str) -> None:
        req.emit({"type": "error", "status": status, "message": message})
        self._finish_metrics(req, "error")

    def _finish_metrics(self, req: Request, outcome: str) -> None:
        """Every request ends here exactly once: count it, give back its adapter reservation."""
        req.ended = True
        self.metrics.requests.inc(outcome=outcome)
        self.registry.unreserve(req.adapter)
