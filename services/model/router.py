"""Model name -> backend routing.

Resolution order for a requested name (the default model when the request names none):

1. an exact key of the routing table;
2. the first glob pattern of the table that matches (``"llama*": "ollama"``);
3. an explicit ``backend/model`` prefix naming an enabled backend
   (``ollama/llama3:8b``; a vLLM model id such as ``openai/Qwen/Qwen2.5-7B`` keeps
   everything after the first slash);
4. the name a backend always answers to (the local model's and the deterministic
   backend's names);
5. the catch-all backend, when one is configured (``default_backend`` ollama or
   openai): the name goes upstream as is, and the backend says whether it has it.

A table value is a backend name (the model is sent upstream under the requested name)
or ``backend/upstream-model`` (an alias). Anything else is ``NOT_FOUND``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from hivewire.services.runtime.errors import NotFound

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Route:
    """Where one request goes.

    Attributes:
        requested: The name the caller asked for (after applying the default).
        backend: The backend that serves it.
        model: The model name sent to that backend.
    """

    requested: str
    backend: str
    model: str


class Router:
    """Resolves model names against the routing table and the enabled backends."""

    def __init__(
        self,
        routes: Mapping[str, str],
        *,
        backends: Collection[str],
        default_model: str,
        default_embedding_model: str,
        fixed_names: Mapping[str, str] | None = None,
        catch_all: str | None = None,
    ) -> None:
        """Create the router.

        Args:
            routes: Model name or glob pattern -> ``backend`` or ``backend/model``.
            backends: Enabled backend names.
            default_model: Name used when a generation request names none.
            default_embedding_model: Name used when an embedding request names none.
            fixed_names: Model name -> backend, for names a backend always serves
                (consulted after the table and prefixes).
            catch_all: Backend for every other name (None: those are NOT_FOUND).
        """
        self._exact = {k: v for k, v in routes.items() if not _GLOB_CHARS & set(k)}
        self._patterns = [(k, v) for k, v in routes.items() if _GLOB_CHARS & set(k)]
        self._backends = frozenset(backends)
        self.default_model = default_model
        self.default_embedding_model = default_embedding_model
        self._fixed = dict(fixed_names or {})
        self._catch_all = catch_all if catch_all in self._backends else None

    @property
    def backends(self) -> frozenset[str]:
        """The enabled backends."""
        return self._backends

    def resolve(self, requested: str, *, embedding: bool = False) -> Route:
        """Find the backend and upstream model name for a request.

        Args:
            requested: The model the caller named; empty means the default.
            embedding: Whether this is an embedding request (other default).

        Returns:
            The route.

        Raises:
            NotFound: No rule routes the name to an enabled backend (``MODEL_NOT_FOUND``).
        """
        name = requested or (self.default_embedding_model if embedding else self.default_model)
        target = self._exact.get(name)
        if target is None:
            target = next((t for p, t in self._patterns if fnmatch.fnmatchcase(name, p)), None)
        if target is not None:
            backend, _, upstream = target.partition("/")
            return self._checked(Route(requested=name, backend=backend, model=upstream or name))
        head, sep, rest = name.partition("/")
        if sep and rest and head in self._backends:
            return Route(requested=name, backend=head, model=rest)
        fixed = self._fixed.get(name)
        if fixed is not None and fixed in self._backends:
            return Route(requested=name, backend=fixed, model=name)
        if self._catch_all is not None:
            return Route(requested=name, backend=self._catch_all, model=name)
        raise NotFound(
            "model",
            name,
            f"model {name!r} is not routed to any enabled backend "
            f"(enabled: {', '.join(sorted(self._backends))}; see HIVEWIRE_MODEL__ROUTES)",
            reason="MODEL_NOT_FOUND",
        )

    def _checked(self, route: Route) -> Route:
        if route.backend not in self._backends:
            raise NotFound(
                "model",
                route.requested,
                f"model {route.requested!r} routes to backend {route.backend!r}, "
                "which is not enabled",
                reason="MODEL_NOT_FOUND",
            )
        return route

    def is_default(self, backend: str, model: str) -> bool:
        """Whether ``model`` on ``backend`` is what an unnamed request gets."""
        try:
            route = self.resolve("")
        except NotFound:
            return False
        return route.backend == backend and route.model == model
