"""The model service's domain: routing, budgets, breakers, usage, metrics and events.

Transport-free: the gRPC servicer validates and converts, then calls
:meth:`ModelService.stream` / :meth:`embed` / :meth:`list_models` here.

Token budget rule (``x-hivewire-token-budget``, the tokens the task may still spend):

* the prompt is estimated at one token per four characters plus four per message;
* with ``max_tokens`` set, a request is refused with ``RESOURCE_EXHAUSTED``
  (``TOKEN_BUDGET_EXCEEDED``, with a ``QuotaFailure``) when
  ``prompt estimate + max_tokens > remaining``;
* without ``max_tokens``, it is refused when ``prompt estimate >= remaining``, and
  otherwise generation is capped at ``remaining - prompt estimate`` tokens;
* a stream that reaches the cap stops (the backend request is aborted) and ends
  with ``FINISH_REASON_BUDGET``;
* the final ``Completion`` carries the usage (the backend's own counts when it
  reports them) so the caller can charge the task.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace

from hivewire.events.v1 import events_pb2
from hivewire.services.model import convert
from hivewire.services.model import metrics as m
from hivewire.services.model.backends.base import (
    Backend,
    EmbedResult,
    GenerationRequest,
    ModelEntry,
    StreamEnd,
    TextDelta,
    estimate_prompt_tokens,
    estimate_tokens,
    is_backend_failure,
)
from hivewire.services.model.domain import (
    BackendState,
    CallInfo,
    Completion,
    Embeddings,
    FinishReason,
    GenerationCall,
    ListedModel,
    ModelListing,
    Usage,
)
from hivewire.services.model.router import Route, Router
from hivewire.services.runtime.breaker import (
    BreakerOptions,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
)
from hivewire.services.runtime.errors import (
    DeadlineExceeded,
    HivewireError,
    Internal,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from hivewire.services.runtime.eventsink import EventSink

logger = logging.getLogger(__name__)


# httpx gets a little more time than the caller so that the service's own deadline
# fires first and the caller sees DEADLINE_EXCEEDED rather than a read timeout.
_TIMEOUT_GRACE = 1.0


ModelEvents = EventSink[events_pb2.ModelEventData]
"""Where ``model.*`` events go (``runtime.events.EventPublisher`` in a process)."""


@dataclass
class _Budget:
    limit: int | None  # most completion tokens the budget allows (None: no cap)
    capped_by_budget: bool  # whether that cap is tighter than the caller's max_tokens


_BACKEND_BREAKER = BreakerOptions(failure_threshold=5, reset_timeout=30.0)
"""A backend's circuit when none is given."""


class ModelService:
    """Serves generation, embedding and listing calls over a set of backends."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        router: Router,
        *,
        request_timeout: float = 300.0,
        list_timeout: float = 5.0,
        breaker: BreakerOptions = _BACKEND_BREAKER,
        events: ModelEvents | None = None,
    ) -> None:
        """Create the service.

        Args:
            backends: Enabled backends by name.
            router: Routes model names to them.
            request_timeout: Seconds a call may take when the caller sets no deadline.
            list_timeout: Seconds each backend gets to answer ListModels.
            breaker: Each backend's circuit: opened by consecutive failures.
            events: Where ``model.*`` events go; None publishes nothing.
        """
        self._backends = dict(backends)
        self.router = router
        self._request_timeout = request_timeout
        self._list_timeout = list_timeout
        self._events = events
        self.breakers = {
            name: CircuitBreaker(
                name,
                failure_threshold=breaker.failure_threshold,
                reset_timeout=breaker.reset_timeout,
                on_state_change=m.record_circuit_state,
            )
            for name in self._backends
        }

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The enabled backends by name."""
        return self._backends

    async def aclose(self) -> None:
        """Close every backend (connection pools, model threads)."""
        for name, backend in self._backends.items():
            try:
                await backend.aclose()
            except Exception:
                logger.warning("closing backend %s failed", name, exc_info=True)

    # -- helpers -----------------------------------------------------------------------

    def _route(self, model: str, *, embedding: bool = False) -> tuple[Route, Backend]:
        route = self.router.resolve(model, embedding=embedding)
        backend = self._backends.get(route.backend)
        if backend is None:
            raise NotFound("model", route.requested, reason="MODEL_NOT_FOUND")
        return route, backend

    def _admit(self, backend: str) -> bool:
        try:
            return self.breakers[backend].acquire()
        except CircuitOpenError as exc:
            m.BACKEND_ERRORS.labels(backend=backend, reason="CIRCUIT_OPEN").inc()
            raise Unavailable(
                f"backend {backend!r} is failing; its circuit is open",
                exc.retry_after,
                reason="MODEL_BACKEND_CIRCUIT_OPEN",
                metadata={"backend": backend},
            ) from None

    def _verdict(self, backend: str, probe: bool, exc: BaseException | None) -> None:
        breaker = self.breakers[backend]
        if exc is None:
            breaker.record_success(probe)
        elif is_backend_failure(exc):
            breaker.record_failure(probe)
        else:
            breaker.release(probe)

    def _timeout(self, info: CallInfo) -> float:
        return self._request_timeout if info.timeout is None else max(info.timeout, 0.0)

    def _publish(self, event_type: str, subject: str, data: events_pb2.ModelEventData) -> None:
        if self._events is None:
            return
        try:
            self._events.publish(event_type, subject=subject, data=data)
        except Exception:  # events are best effort: never fail a model call for one
            logger.warning("publishing %s failed", event_type, exc_info=True)

    @staticmethod
    def _budget(call: GenerationCall, info: CallInfo, prompt_estimate: int) -> _Budget:
        requested = call.params.max_tokens
        remaining = info.token_budget
        if remaining is None:
            return _Budget(limit=None, capped_by_budget=False)
        if requested is not None and prompt_estimate + requested > remaining:
            raise _budget_exceeded(
                f"request needs up to {prompt_estimate + requested} tokens "
                f"(prompt ~{prompt_estimate} + max_tokens {requested}); "
                f"the task has {remaining} left",
                info,
                remaining,
                prompt_estimate,
            )
        if requested is None and prompt_estimate >= remaining:
            raise _budget_exceeded(
                f"the prompt alone (~{prompt_estimate} tokens) uses up the task's "
                f"remaining {remaining} tokens",
                info,
                remaining,
                prompt_estimate,
            )
        allowance = remaining - prompt_estimate
        if requested is not None and requested <= allowance:
            return _Budget(limit=requested, capped_by_budget=False)
        return _Budget(limit=allowance, capped_by_budget=True)

    # -- generation ----------------------------------------------------------------------

    async def stream(
        self, call: GenerationCall, info: CallInfo
    ) -> AsyncGenerator[str | Completion, None]:
        """Run a Chat or Generate call.

        Yields:
            Text as the backend produces it, then exactly one :class:`Completion`.

        Raises:
            NotFound: The model is not routed (``MODEL_NOT_FOUND``) or the backend does
                not know it.
            ResourceExhausted: The token budget does not allow the request.
            Unavailable: The backend is down, broke off, or its circuit is open.
            DeadlineExceeded: The caller's deadline passed.
            HivewireError: Other errors the backend reported.
        """
        started = time.monotonic()
        route, backend = self._route(call.model)
        prompt_estimate = estimate_prompt_tokens(call.messages)
        budget = self._budget(call, info, prompt_estimate)
        params = call.params
        if budget.capped_by_budget:
            params = replace(params, max_tokens=budget.limit)
        probe = self._admit(route.backend)
        timeout = self._timeout(info)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request = GenerationRequest(
            model=route.model,
            messages=call.messages,
            params=params,
            timeout=timeout + _TIMEOUT_GRACE,
            operation=call.operation,
            prompt=call.prompt,
            system=call.system,
        )
        request_id = uuid.uuid4().hex
        labels = {"model": m.model_label(route.model), "backend": route.backend}
        self._publish(
            "model.request_started",
            request_id,
            convert.model_event(request_id, route, info.task_id, call.operation),
        )
        logger.debug(
            "%s on %s/%s (budget %s, timeout %.1fs)",
            call.operation,
            route.backend,
            route.model,
            info.token_budget,
            timeout,
        )
        m.INFLIGHT.labels(backend=route.backend).inc()
        produced = 0
        first_token_at: float | None = None
        end: StreamEnd | None = None
        finish: FinishReason | None = None
        failure: BaseException | None = None
        try:
            async with aclosing(backend.stream(request)) as items:
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await anext(items, None)
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"no answer from {route.backend} within the caller's deadline "
                            f"({timeout:.1f}s)",
                            metadata={"backend": route.backend},
                        ) from None
                    if item is None:
                        raise Internal(f"backend {route.backend} ended a stream without its end")
                    if isinstance(item, StreamEnd):
                        end = item
                        break
                    if not isinstance(item, TextDelta) or not item.text:
                        continue
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                    produced += item.tokens
                    yield item.text
                    if (
                        budget.capped_by_budget
                        and budget.limit is not None
                        and produced >= budget.limit
                    ):
                        finish = "budget"
                        break  # leaving the block closes the backend stream: no more tokens
        except BaseException as exc:
            failure = exc
            raise
        finally:
            m.INFLIGHT.labels(backend=route.backend).dec()
            self._verdict(route.backend, probe, failure)
            if failure is not None:
                self._failed(request_id, route, info, call.operation, failure, started)
        if finish is None:
            assert end is not None
            finish = end.finish
            if finish == "length" and budget.capped_by_budget:
                finish = "budget"
        prompt_tokens = (
            end.prompt_tokens if end and end.prompt_tokens is not None else prompt_estimate
        )
        completion_tokens = (
            end.completion_tokens if end and end.completion_tokens is not None else produced
        )
        total = time.monotonic() - started
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            time_to_first_token=None if first_token_at is None else first_token_at - started,
            total_time=total,
        )
        m.REQUESTS.labels(backend=route.backend, operation=call.operation, outcome=finish).inc()
        m.PROMPT_TOKENS.labels(**labels).inc(prompt_tokens)
        m.COMPLETION_TOKENS.labels(**labels).inc(completion_tokens)
        m.REQUEST_SECONDS.labels(backend=route.backend, operation=call.operation).observe(total)
        if usage.time_to_first_token is not None:
            m.TIME_TO_FIRST_TOKEN.labels(**labels).observe(usage.time_to_first_token)
        completion = Completion(
            finish_reason=finish,
            usage=usage,
            model=end.model if end is not None else route.model,
            backend=route.backend,
        )
        self._publish(
            "model.request_completed",
            request_id,
            convert.model_event(request_id, route, info.task_id, call.operation, usage=usage),
        )
        yield completion

    def _failed(
        self,
        request_id: str,
        route: Route,
        info: CallInfo,
        operation: str,
        exc: BaseException,
        started: float,
    ) -> None:
        if isinstance(exc, GeneratorExit | asyncio.CancelledError):
            outcome, error = "cancelled", None
        elif isinstance(exc, HivewireError):
            outcome, error = "error", exc
            m.BACKEND_ERRORS.labels(backend=route.backend, reason=exc.reason).inc()
        else:
            outcome, error = "error", None
            m.BACKEND_ERRORS.labels(backend=route.backend, reason="INTERNAL").inc()
        m.REQUESTS.labels(backend=route.backend, operation=operation, outcome=outcome).inc()
        m.REQUEST_SECONDS.labels(backend=route.backend, operation=operation).observe(
            time.monotonic() - started
        )
        self._publish(
            "model.failed",
            request_id,
            convert.model_event(
                request_id,
                route,
                info.task_id,
                operation,
                error=error,
                cancelled=outcome == "cancelled",
            ),
        )

    # -- embeddings ------------------------------------------------------------------------

    async def embed(self, model: str, inputs: Sequence[str], info: CallInfo) -> Embeddings:
        """Embed texts with the named (or default embedding) model.

        Raises:
            NotFound: The model is not routed or unknown to its backend.
            ResourceExhausted: The inputs alone exceed the token budget.
            Unavailable: The backend is down or its circuit is open.
            DeadlineExceeded: The caller's deadline passed.
        """
        started = time.monotonic()
        route, backend = self._route(model, embedding=True)
        estimate = sum(estimate_tokens(text) for text in inputs)
        if info.token_budget is not None and estimate > info.token_budget:
            raise ResourceExhausted(
                f"inputs need ~{estimate} tokens; the task has {info.token_budget} left",
                [
                    QuotaViolation(
                        f"task:{info.task_id}" if info.task_id else "task", "token budget"
                    )
                ],
                reason="TOKEN_BUDGET_EXCEEDED",
                metadata={"remaining_tokens": str(info.token_budget)},
            )
        probe = self._admit(route.backend)
        timeout = self._timeout(info)
        request_id = uuid.uuid4().hex
        failure: BaseException | None = None
        result: EmbedResult
        try:
            async with asyncio.timeout(timeout):
                result = await backend.embed(
                    route.model, list(inputs), time_limit=timeout + _TIMEOUT_GRACE
                )
        except TimeoutError:
            failure = DeadlineExceeded(f"no embeddings from {route.backend} within the deadline")
            raise failure from None
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._verdict(route.backend, probe, failure)
            if failure is not None:
                self._failed(request_id, route, info, "embed", failure, started)
        total = time.monotonic() - started
        usage = Usage(
            prompt_tokens=result.prompt_tokens if result.prompt_tokens is not None else estimate,
            completion_tokens=0,
            time_to_first_token=None,
            total_time=total,
        )
        m.REQUESTS.labels(backend=route.backend, operation="embed", outcome="stop").inc()
        m.PROMPT_TOKENS.labels(model=m.model_label(route.model), backend=route.backend).inc(
            usage.prompt_tokens
        )
        m.REQUEST_SECONDS.labels(backend=route.backend, operation="embed").observe(total)
        self._publish(
            "model.request_completed",
            request_id,
            convert.model_event(request_id, route, info.task_id, "embed", usage=usage),
        )
        return Embeddings(vectors=result.vectors, model=result.model, usage=usage)

    # -- listing ---------------------------------------------------------------------------

    async def list_models(
        self, backend: str = "", *, time_limit: float | None = None
    ) -> ModelListing:
        """List the models of every enabled backend (or one), concurrently.

        A backend that fails to answer is reported in :attr:`ModelListing.backends`
        rather than failing the call.

        Raises:
            NotFound: ``backend`` names no enabled backend (``BACKEND_NOT_FOUND``).
        """
        if backend and backend not in self._backends:
            raise NotFound("backend", backend, reason="BACKEND_NOT_FOUND")
        names = [backend] if backend else list(self._backends)
        limit = self._list_timeout if time_limit is None else min(self._list_timeout, time_limit)

        async def one(name: str) -> tuple[list[ModelEntry], HivewireError | None]:
            try:
                probe = self._admit(name)
            except Unavailable as exc:
                return [], exc
            failure: BaseException | None = None
            try:
                async with asyncio.timeout(limit):
                    return await self._backends[name].list_models(
                        time_limit=limit + _TIMEOUT_GRACE
                    ), None
            except TimeoutError:
                failure = DeadlineExceeded(f"{name} did not list its models within {limit:.1f}s")
                return [], failure
            except HivewireError as exc:
                failure = exc
                return [], exc
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._verdict(name, probe, failure)

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(name)) for name in names]
        models: list[ListedModel] = []
        states: list[BackendState] = []
        for name, task in zip(names, tasks, strict=True):
            entries, error = task.result()
            states.append(
                BackendState(
                    name,
                    available=error is None,
                    error=error,
                    circuit_open=self.breakers[name].state is CircuitState.OPEN,
                )
            )
            models.extend(
                ListedModel(name, entry, self.router.is_default(name, entry.name))
                for entry in entries
            )
        return ModelListing(models=models, backends=states)


def _budget_exceeded(
    message: str, info: CallInfo, remaining: int, prompt_estimate: int
) -> ResourceExhausted:
    """The ``TOKEN_BUDGET_EXCEEDED`` error of a call the task's budget cannot pay for."""
    subject = f"task:{info.task_id}" if info.task_id else "task"
    return ResourceExhausted(
        message,
        [QuotaViolation(subject, f"token budget: {remaining} tokens remaining")],
        reason="TOKEN_BUDGET_EXCEEDED",
        metadata={
            "remaining_tokens": str(remaining),
            "prompt_tokens_estimate": str(prompt_estimate),
        },
    )
