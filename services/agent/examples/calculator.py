"""The calculator example agent: a planner/calculator that needs no model.

Serve it with ``hivewire agent serve hivewire.services.agent.examples.calculator:CalculatorAgent``.

* ``calculate``: evaluates one or more arithmetic expressions (one per line or ``;``
  separated, or JSON ``{"expressions": [...]}``), one progress step each, with the tool
  service's ``calculator`` tool; without a tool service it evaluates them itself.
* ``solve``: evaluates one expression with named variables
  (``{"expression": "price * qty * (1 + vat)", "variables": {"vat": 0.2}}``) and asks a
  person, through the coordinator, for every variable it was not given: the
  input-required flow end to end.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from hivewire.services.agent import (
    Agent,
    Payload,
    PermanentError,
    TaskContext,
    capability,
)
from hivewire.services.runtime.errors import Unavailable
from hivewire.services.tool.builtins.calculator import CONSTANTS, FUNCTIONS, evaluate_tree
from hivewire.services.tool.sdk import ToolError

MAX_EXPRESSIONS = 100
"""Most expressions one ``calculate`` task may carry."""

MAX_EXPRESSION_CHARS = 1000

_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def parse(expression: str) -> ast.expr:
    """Parse an arithmetic expression (``^`` means power).

    Raises:
        PermanentError: ``INVALID_EXPRESSION`` for anything but arithmetic.
    """
    if not expression.strip() or len(expression) > MAX_EXPRESSION_CHARS:
        raise PermanentError("INVALID_EXPRESSION", "expressions are 1 to 1000 characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise PermanentError("INVALID_EXPRESSION", f"{expression!r}: {exc.msg}") from None
    for node in ast.walk(tree):
        allowed = (
            ast.Expression,
            ast.BinOp,
            ast.UnaryOp,
            ast.Call,
            ast.Name,
            ast.Constant,
            ast.Load,
            ast.operator,
            ast.unaryop,
        )
        if not isinstance(node, allowed):
            raise PermanentError(
                "INVALID_EXPRESSION", f"{type(node).__name__} is not allowed in {expression!r}"
            )
        if isinstance(node, ast.Constant) and not isinstance(node.value, int | float):
            raise PermanentError("INVALID_EXPRESSION", f"only numbers are allowed: {expression!r}")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and not node.keywords
        ):
            raise PermanentError("INVALID_EXPRESSION", f"unknown function in {expression!r}")
    return tree.body


def free_variables(tree: ast.expr) -> list[str]:
    """Names in an expression that are neither constants nor functions, in order."""
    functions = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    names: dict[str, None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in functions and node.id not in CONSTANTS:
            names.setdefault(node.id, None)
    return list(names)


def substitute(tree: ast.expr, values: dict[str, float]) -> str:
    """The expression with variables replaced by their values, as text."""

    class _Sub(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            if node.id in values:
                return ast.copy_location(ast.Constant(values[node.id]), node)
            return node

    return ast.unparse(_Sub().visit(ast.Expression(body=tree)))


def evaluate_locally(tree: ast.expr) -> float | int:
    """Evaluate a parsed expression without the tool service.

    The arithmetic is the ``calculator`` tool's own evaluator, run in this process, so
    the answer (and its bounds) do not depend on where it was computed.

    Raises:
        PermanentError: An unknown name, division by zero, a math domain error or a
            result out of bounds (the tool's reason).
    """
    unknown = free_variables(tree)
    if unknown:
        raise PermanentError("UNKNOWN_VARIABLE", f"no value for {unknown[0]!r}")
    try:
        return evaluate_tree(tree)
    except ToolError as exc:
        raise PermanentError(exc.reason, exc.message) from None


class CalculatorAgent(Agent):
    """Evaluates arithmetic step by step; asks a person for values it does not know."""

    name = "calculator"
    version = "1.0.0"
    max_concurrency = 16
    labels = {"example": "true", "uses": "tools"}

    @capability(
        "calculate",
        description="Evaluate arithmetic expressions, one progress step each.",
        input='Expressions, one per line or ";"-separated, or JSON {"expressions": [str]}.',
        output="The results, one per line, with JSON {results: [{expression, value}], engine}.",
        input_schema={
            "type": "object",
            "properties": {"expressions": {"type": "array", "items": {"type": "string"}}},
            "required": ["expressions"],
        },
    )
    async def calculate(self, task: Payload, ctx: TaskContext) -> Payload:
        """Evaluate every expression of the input."""
        expressions = _expressions(task)
        trees = [parse(e) for e in expressions]
        await ctx.progress(0.0, "plan", f"{len(expressions)} expression(s) to evaluate")
        results: list[dict[str, Any]] = []
        engine = "tool"
        for index, (expression, tree) in enumerate(zip(expressions, trees, strict=True), start=1):
            unknown = free_variables(tree)
            if unknown:
                raise PermanentError(
                    "UNKNOWN_VARIABLE",
                    f"{expression!r} uses {', '.join(unknown)}; use the solve capability",
                )
            value, engine = await _evaluate(ctx, expression, tree, engine)
            results.append({"expression": expression, "value": value})
            await ctx.progress(
                index / len(expressions), "evaluate", f"{expression} = {_show(value)}"
            )
        text = "\n".join(f"{r['expression']} = {_show(r['value'])}" for r in results)
        return Payload(text=text, json={"results": results, "engine": engine})

    @capability(
        "solve",
        description=(
            "Evaluate an expression with named variables, asking a person for every value "
            "the task did not give."
        ),
        input='JSON {"expression": str, "variables": {name: number}}, or the expression as text.',
        output="JSON {expression, variables, value}; the text is 'expression = value'.",
        input_schema={
            "type": "object",
            "properties": {
                "expression": {"type": "string"},
                "variables": {"type": "object", "additionalProperties": {"type": "number"}},
            },
            "required": ["expression"],
        },
    )
    async def solve(self, task: Payload, ctx: TaskContext) -> Payload:
        """Fill in the variables (asking for missing ones) and evaluate."""
        data = dict(task.json or {})
        expression = str(data.get("expression") or task.text).strip()
        given = data.get("variables") or {}
        if not isinstance(given, dict):
            raise PermanentError("INVALID_INPUT", "variables must be an object")
        tree = parse(expression)
        names = free_variables(tree)
        values: dict[str, float] = {}
        await ctx.progress(0.1, "plan", f"variables: {', '.join(names) or 'none'}")
        for index, name in enumerate(names, start=1):
            if name in given:
                values[name] = _number(given[name], name)
                continue
            await ctx.progress(
                0.1 + 0.6 * index / max(1, len(names)), "ask", f"waiting for the value of {name}"
            )
            answer = await ctx.request_input(
                f"What is the value of {name} in {expression}?",
                schema={"type": "number"},
            )
            raw = answer.json.get("value") if answer.json else answer.text
            values[name] = _number(raw, name)
        concrete = substitute(tree, values)
        await ctx.progress(0.8, "evaluate", concrete)
        value, _ = await _evaluate(ctx, concrete, parse(concrete), "tool")
        await ctx.progress(1.0, "done", f"{expression} = {_show(value)}")
        return Payload(
            text=f"{expression} = {_show(value)}",
            json={"expression": expression, "variables": values, "value": value},
        )


async def _evaluate(
    ctx: TaskContext, expression: str, tree: ast.expr, engine: str
) -> tuple[Any, str]:
    """Evaluate with the tool service's calculator, or locally when there is none."""
    if engine == "tool":
        try:
            out = await ctx.tools.invoke("calculator", {"expression": expression})
        except (RuntimeError, Unavailable) as exc:
            # No tool service configured or reachable: this agent can still do the work.
            ctx.logger.info("tool service unavailable (%s); evaluating locally", exc)
        else:
            return out.result.get("value"), "tool"
    return evaluate_locally(tree), "local"


def _expressions(task: Payload) -> list[str]:
    if task.json is not None and "expressions" in task.json:
        raw = task.json["expressions"]
        if not isinstance(raw, list):
            raise PermanentError("INVALID_INPUT", "expressions must be a list of strings")
        items = [str(e).strip() for e in raw]
    else:
        items = [p.strip() for p in re.split(r"[;\n]", task.as_text())]
    expressions = [e for e in items if e]
    if not expressions:
        raise PermanentError("EMPTY_INPUT", "there is no expression to evaluate")
    if len(expressions) > MAX_EXPRESSIONS:
        raise PermanentError("INVALID_INPUT", f"at most {MAX_EXPRESSIONS} expressions per task")
    return expressions


def _number(raw: Any, name: str) -> float:
    if not _VARIABLE.match(name):
        raise PermanentError("INVALID_INPUT", f"invalid variable name {name!r}")
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise PermanentError("INVALID_INPUT", f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise PermanentError("INVALID_INPUT", f"{name} must be finite")
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)
