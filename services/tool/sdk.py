"""The public plugin API of the tool service: the ``@tool`` decorator and its helpers.

A plugin is a Python package that exposes decorated functions through the
``hivewire.tools`` entry point group::

    # acme_tools/__init__.py
    from hivewire.services.tool.sdk import ToolContext, ToolError, tool

    @tool(description="Convert an amount between currencies.")
    async def convert(amount: float, source: str, target: str, ctx: ToolContext) -> float:
        ctx.progress(0.5, "rates", "fetching rates")
        ...

    # pyproject.toml
    [project.entry-points."hivewire.tools"]
    acme = "acme_tools"

The JSON Schema of the arguments comes from the type hints (pydantic), parameter
descriptions from the Google-style ``Args:`` section of the docstring. Synchronous
functions run on a thread of their own and should call :meth:`ToolContext.check_cancelled`
in long loops; coroutine functions are cancelled like any asyncio task.

:func:`arguments_digest` is the one definition of the digest that approvals quote:
hex SHA-256 of the canonical JSON of the arguments. Agents and the service both use it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from types import ModuleType
from typing import Any, TypedDict, TypeVar, Unpack, get_type_hints, overload

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic_core import PydanticUndefined, to_jsonable_python

from hivewire.services.base.keywords import check_keywords

__all__ = [
    "ENTRY_POINT_GROUP",
    "TOOL_NAME_PATTERN",
    "ToolCancelled",
    "ToolContext",
    "ToolDefinition",
    "ToolError",
    "ToolOptions",
    "ToolOutput",
    "arguments_digest",
    "canonical_json",
    "collect_tools",
    "definition_of",
    "normalize_json",
    "tool",
]

ENTRY_POINT_GROUP = "hivewire.tools"
"""The entry point group the service loads plugins from."""

TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
"""Valid tool names: letters, digits, ``_``, ``.`` and ``-``, at most 128 characters."""

_ATTRIBUTE = "__hivewire_tool__"
_MAX_SAFE_INTEGER = 2**53

F = TypeVar("F", bound=Callable[..., Any])


# -- canonical JSON and the arguments digest ------------------------------------------


def normalize_json(value: Any) -> Any:
    """Return ``value`` as plain JSON data with integral floats turned into ints.

    ``google.protobuf.Struct`` carries every number as a double, so ``{"n": 3}`` arrives as
    ``{"n": 3.0}``; normalizing makes both spell ``3``, which keeps digests equal on
    either side of the wire.

    Args:
        value: JSON-like data (dicts with string keys, lists, tuples, str, numbers, bools, None).

    Returns:
        The normalized copy.

    Raises:
        ValueError: A number is NaN or infinite, or a key is not a string.
        TypeError: A value is not JSON data.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a JSON number")
        if value.is_integer() and abs(value) < _MAX_SAFE_INTEGER:
            return int(value)
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"JSON object keys must be strings, got {key!r}")
            out[key] = normalize_json(item)
        return out
    if isinstance(value, list | tuple):
        return [normalize_json(item) for item in value]
    raise TypeError(f"{type(value).__name__} is not JSON data")


def canonical_json(value: Any) -> str:
    """Serialize JSON data canonically: normalized numbers, sorted keys, no spaces.

    Strings are written as UTF-8 text (``ensure_ascii=False``), with JSON's mandatory
    escapes only. Other languages must do the same to compute equal digests.

    Args:
        value: JSON-like data.

    Returns:
        The canonical text.
    """
    return json.dumps(
        normalize_json(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def arguments_digest(args: Mapping[str, Any]) -> str:
    """Digest of tool arguments as quoted by an approval.

    Args:
        args: The arguments object of a tool call.

    Returns:
        Lower-case hex SHA-256 of the UTF-8 canonical JSON (:func:`canonical_json`).
    """
    return hashlib.sha256(canonical_json(dict(args)).encode("utf-8")).hexdigest()


# -- what tools raise, receive and return ---------------------------------------------


class ToolError(Exception):
    """Raised by a tool that ran but could not do the job: a classified error result.

    The caller receives it as the ``error`` message of the call's stream (not as a gRPC
    error), so a model can read it and try something else.

    Attributes:
        message: What went wrong, for people and models.
        reason: Stable UPPER_SNAKE identifier callers branch on.
        code: gRPC status code name that best describes it (``INVALID_ARGUMENT``,
            ``NOT_FOUND``, ``UNAVAILABLE``...).
        retryable: Whether calling again later may succeed.
        metadata: Extra string key/values.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = "TOOL_ERROR",
        code: str = "UNKNOWN",
        retryable: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error.

        Args:
            message: What went wrong.
            reason: Stable UPPER_SNAKE reason.
            code: gRPC status code name.
            retryable: Whether a retry may succeed.
            metadata: Extra string key/values.
        """
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.code = code
        self.retryable = retryable
        self.metadata: dict[str, str] = dict(metadata or {})


class ToolCancelled(BaseException):
    """Raised by :meth:`ToolContext.check_cancelled` once the call is over.

    A ``BaseException`` like ``asyncio.CancelledError``, so ``except Exception`` in tool
    code does not swallow it.
    """


@dataclass(frozen=True)
class ToolOutput:
    """An explicit result: structured data and a text rendering for models.

    Return it from a tool to choose the text yourself; any other return value is turned
    into ``{"result": value}`` (or the dict itself) with a JSON text.

    Attributes:
        result: The structured result (a JSON object).
        text: The text rendering; None renders ``result`` as JSON.
    """

    result: Mapping[str, Any] = field(default_factory=dict)
    text: str | None = None


ProgressCallback = Callable[[float, str, str], None]


@dataclass(kw_only=True, eq=False)
class ToolContext:
    """What a tool may know and do about the call it serves.

    Declare a parameter annotated ``ToolContext`` (any name) to receive it; it is not
    part of the arguments schema. Every method is safe to call from a tool's thread.
    The service creates one for every call.

    Attributes:
        tool_name: The tool being called.
        call_id: The caller's id for this call.
        task_id: The task the call is made for.
        caller: The caller's SPIFFE id.
        correlation_id: Correlation id of the work.
        deadline: ``time.monotonic()`` value the call must end by, if any.
        on_progress: Receives ``(fraction, step, message)`` for each report.
    """

    tool_name: str
    call_id: str = ""
    task_id: str = ""
    caller: str = ""
    correlation_id: str = ""
    deadline: float | None = None
    on_progress: InitVar[ProgressCallback | None] = None

    def __post_init__(self, on_progress: ProgressCallback | None) -> None:
        self._on_progress = on_progress
        self._cancelled = threading.Event()

    def progress(self, fraction: float, step: str = "", message: str = "") -> None:
        """Report progress; streamed to the caller (coalesced when reports come fast).

        Args:
            fraction: Completed fraction, clamped to [0, 1].
            step: Short machine-friendly name of the current step.
            message: Human-readable note.
        """
        if self._on_progress is not None and not self._cancelled.is_set():
            value = fraction if math.isfinite(fraction) else 0.0
            self._on_progress(min(max(value, 0.0), 1.0), step, message)

    @property
    def cancelled(self) -> bool:
        """True once the call was cancelled or timed out: stop and return."""
        return self._cancelled.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`ToolCancelled` if the call is over (call it in long loops).

        Raises:
            ToolCancelled: The call was cancelled or timed out.
        """
        if self._cancelled.is_set():
            raise ToolCancelled(f"call of {self.tool_name} is over")

    def time_remaining(self) -> float | None:
        """Seconds left before the call times out, or None without a deadline."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def cancel(self) -> None:
        """Mark the call as over (the service calls this on cancel and timeout)."""
        self._cancelled.set()


# -- the decorator ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ToolDefinition:
    """A tool made from a Python function by :func:`tool`.

    Attributes:
        name: The name callers invoke it by.
        description: What it does (models read this).
        func: The function.
        input_schema: JSON Schema of the arguments object.
        output_schema: JSON Schema of the result object, when the return type is known.
        requires_approval: Whether each call needs a person's approval.
        timeout: Cap (s) on one call; None uses the service default.
        version: The tool's version ("" when unknown; plugins get their package's).
        approval_prompt: ``str.format`` template over the arguments for the approval
            question, e.g. ``"Send mail to {to}?"``.
        is_async: Whether ``func`` is a coroutine function.
        context_parameter: Name of the ``ToolContext`` parameter, if any.
        arguments_model: pydantic model that validates and converts the arguments.
        result_adapter: pydantic adapter of the return type, if annotated.
        wrap_result: Whether results are returned as ``{"result": value}``.
    """

    name: str
    description: str
    func: Callable[..., Any]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    requires_approval: bool
    timeout: float | None
    version: str
    approval_prompt: str | None
    is_async: bool
    context_parameter: str | None
    arguments_model: type[BaseModel]
    result_adapter: TypeAdapter[Any] | None
    wrap_result: bool

    def bind(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and convert arguments into keyword arguments of ``func``.

        Args:
            arguments: The call's JSON arguments.

        Returns:
            Keyword arguments (without the context).

        Raises:
            pydantic.ValidationError: The arguments do not fit the signature.
        """
        model = self.arguments_model.model_validate(dict(arguments))
        return {name: getattr(model, name) for name in type(model).model_fields}

    def render(self, value: Any) -> tuple[dict[str, Any], str]:
        """Turn a return value into ``(result object, text)``.

        Args:
            value: What ``func`` returned.

        Returns:
            The JSON result object and its text rendering.
        """
        if isinstance(value, ToolOutput):
            result = normalize_json(to_jsonable_python(dict(value.result), fallback=str))
            text = value.text if value.text is not None else _json_text(result)
            return result, text
        if self.result_adapter is not None:
            # A tool returning something other than its annotation still gets rendered.
            data = self.result_adapter.dump_python(value, mode="json", fallback=str, warnings=False)
        else:
            data = to_jsonable_python(value, fallback=str)
        data = normalize_json(data)
        result = data if isinstance(data, dict) and not self.wrap_result else {"result": data}
        text = value if isinstance(value, str) else _json_text(data)
        return result, text

    def prompt_for(self, arguments: Mapping[str, Any]) -> str:
        """The approval question for a call with these arguments."""
        if self.approval_prompt:
            try:
                return self.approval_prompt.format_map(dict(arguments))
            except (KeyError, IndexError, ValueError, AttributeError):
                pass
        return default_approval_prompt(self.name, arguments)


def default_approval_prompt(name: str, arguments: Mapping[str, Any], limit: int = 300) -> str:
    """``Allow <tool> with {...}?``, the arguments cut to ``limit`` characters."""
    text = canonical_json(dict(arguments))
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"Allow {name} with {text}?"


def _json_text(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


_ARGS_HEADER = re.compile(r"^(Args|Arguments|Parameters):\s*$")
_SECTION_HEADER = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")
_ARG_LINE = re.compile(r"^(\s+)\*{0,2}(\w+)(?:\s*\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (summary, {parameter: description}).

    The summary is the first paragraph; parameter descriptions come from the ``Args:``
    section, continuation lines joined.
    """
    lines = doc.splitlines()
    first_section = next(
        (i for i, line in enumerate(lines) if _SECTION_HEADER.match(line)), len(lines)
    )
    paragraph = "\n".join(lines[:first_section]).strip().split("\n\n")[0]
    summary = " ".join(paragraph.split())
    params: dict[str, str] = {}
    current: str | None = None
    arg_indent: int | None = None
    in_args = False
    for line in lines[first_section:]:
        if _SECTION_HEADER.match(line):
            in_args, current, arg_indent = bool(_ARGS_HEADER.match(line)), None, None
            continue
        if not in_args or not line.strip():
            continue
        match = _ARG_LINE.match(line)
        indent = len(line) - len(line.lstrip())
        if match and (arg_indent is None or indent <= arg_indent):
            arg_indent = indent
            current = match.group(2)
            params[current] = match.group(3).strip()
        elif current is not None:
            params[current] = f"{params[current]} {line.strip()}".strip()
    return summary, params


class ToolOptions(TypedDict, total=False):
    """What ``@tool(...)`` takes besides the function (every key optional).

    Attributes:
        name: Tool name; defaults to the function's name.
        description: What it does; defaults to the docstring's first paragraph.
        requires_approval: Whether each call needs a person's approval first (False).
        timeout: Cap (s) on one call; None uses the service's default.
        version: The tool's version; plugins default to their distribution's.
        approval_prompt: ``str.format`` template over the arguments for the approval
            question (``"Delete {path}?"``).
    """

    name: str | None
    description: str | None
    requires_approval: bool
    timeout: float | None
    version: str
    approval_prompt: str | None


def _build_definition(func: Callable[..., Any], options: ToolOptions) -> ToolDefinition:
    if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
        raise TypeError(f"{func.__qualname__}: generator functions cannot be tools")
    if not callable(func):
        raise TypeError(f"{func!r} is not callable")
    tool_name = options.get("name") or func.__name__
    if not TOOL_NAME_PATTERN.match(tool_name):
        raise ValueError(
            f"invalid tool name {tool_name!r}: use letters, digits, '_', '.', '-' (max 128)"
        )
    timeout = options.get("timeout")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"tool {tool_name}: timeout must be positive")
    summary, param_docs = _parse_docstring(inspect.getdoc(func) or "")
    hints = get_type_hints(func, include_extras=True)
    signature = inspect.signature(func)
    fields: dict[str, Any] = {}
    context_parameter: str | None = None
    for param in signature.parameters.values():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(f"tool {tool_name}: *args and **kwargs are not supported")
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(f"tool {tool_name}: positional-only parameters are not supported")
        annotation = hints.get(param.name, Any)
        if annotation is ToolContext:
            context_parameter = param.name
            continue
        default = PydanticUndefined if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (
            annotation,
            Field(default, description=param_docs.get(param.name)),
        )
    model_name = re.sub(r"\W", "_", tool_name).title().replace("_", "") + "Arguments"
    arguments_model = create_model(model_name, __config__=ConfigDict(extra="forbid"), **fields)
    input_schema = arguments_model.model_json_schema()
    input_schema.setdefault("properties", {})
    input_schema["type"] = "object"

    result_adapter: TypeAdapter[Any] | None = None
    output_schema: dict[str, Any] | None = None
    wrap_result = True
    return_hint = hints.get("return", inspect.Signature.empty)
    if return_hint not in (inspect.Signature.empty, Any, None, type(None), ToolOutput):
        result_adapter = TypeAdapter(return_hint)
        schema = result_adapter.json_schema(mode="serialization")
        if schema.get("type") == "object":
            output_schema, wrap_result = schema, False
        else:
            defs = schema.pop("$defs", None)
            output_schema = {
                "type": "object",
                "properties": {"result": schema},
                "required": ["result"],
            }
            if defs:
                output_schema["$defs"] = defs
    return ToolDefinition(
        name=tool_name,
        description=(options.get("description") or summary or tool_name).strip(),
        func=func,
        input_schema=input_schema,
        output_schema=output_schema,
        requires_approval=options.get("requires_approval", False),
        timeout=timeout,
        version=options.get("version", ""),
        approval_prompt=options.get("approval_prompt"),
        is_async=inspect.iscoroutinefunction(func),
        context_parameter=context_parameter,
        arguments_model=arguments_model,
        result_adapter=result_adapter,
        wrap_result=wrap_result,
    )


@overload
def tool(func: F, /) -> F: ...


@overload
def tool(**options: Unpack[ToolOptions]) -> Callable[[F], F]: ...


def tool(func: F | None = None, /, **options: Unpack[ToolOptions]) -> F | Callable[[F], F]:
    """Make a function a tool (``@tool`` or ``@tool(name=..., ...)``).

    The function is returned unchanged (so it stays directly callable and testable),
    with its :class:`ToolDefinition` attached; :func:`definition_of` reads it back.

    Args:
        func: The function, when used without parentheses.
        **options: :class:`ToolOptions`: ``name``, ``description``,
            ``requires_approval``, ``timeout``, ``version``, ``approval_prompt``.

    Returns:
        The function (or a decorator that returns it).

    Raises:
        TypeError: The signature cannot be a tool (``*args``, generators...).
        ValueError: Invalid name or timeout.
    """
    check_keywords("tool", options, ToolOptions.__optional_keys__)

    def decorate(fn: F) -> F:
        definition = _build_definition(fn, options)
        setattr(fn, _ATTRIBUTE, definition)
        return fn

    if func is not None:
        return decorate(func)
    return decorate


def definition_of(obj: object) -> ToolDefinition | None:
    """The :class:`ToolDefinition` of a decorated function (or a definition itself)."""
    if isinstance(obj, ToolDefinition):
        return obj
    found = getattr(obj, _ATTRIBUTE, None)
    return found if isinstance(found, ToolDefinition) else None


def collect_tools(obj: object) -> list[ToolDefinition]:
    """Every tool an entry point object provides.

    Args:
        obj: A decorated function, a :class:`ToolDefinition`, a module (its decorated
            public functions, in definition order), an iterable of those, or a
            zero-argument callable returning one of those (a factory).

    Returns:
        The definitions found.

    Raises:
        TypeError: ``obj`` provides no tool.
    """
    found = definition_of(obj)
    if found is not None:
        return [found]
    if isinstance(obj, ModuleType):
        tools = [
            definition
            for attr, value in vars(obj).items()
            if not attr.startswith("_") and (definition := definition_of(value)) is not None
        ]
        if not tools:
            raise TypeError(f"module {obj.__name__} has no @tool functions")
        return tools
    if isinstance(obj, Iterable) and not isinstance(obj, str | bytes | Mapping):
        tools = []
        for item in obj:
            tools.extend(collect_tools(item))
        return tools
    if callable(obj):
        return collect_tools(obj())
    raise TypeError(f"{obj!r} is not a tool, a module of tools or a list of tools")


def validation_violations(err: ValidationError) -> list[tuple[str, str]]:
    """``(path, message)`` pairs of a pydantic error, paths like ``items[2].name``."""
    out = []
    for error in err.errors():
        path = ""
        for part in error.get("loc", ()):
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        out.append((path, str(error.get("msg", "invalid"))))
    return out
