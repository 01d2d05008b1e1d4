"""``calculator``: arithmetic on numbers, evaluated by walking the syntax tree (no eval).

Accepted: integers, decimals and scientific notation; ``+ - * / // % **``, unary ``+``
and ``-``, parentheses; the constants ``pi``, ``e``, ``tau``; and the functions
``abs, round, min, max, sqrt, exp, log, log2, log10, sin, cos, tan, asin, acos, atan,
atan2, sinh, cosh, tanh, floor, ceil, hypot, factorial, gcd``. Anything else (names,
attributes, calls of other functions, comparisons, strings...) is refused.

Bounds keep a call cheap: at most 500 characters and 200 syntax nodes, exponents up to
10,000 in absolute value, integers up to 4,096 bits, ``factorial`` up to 1,000.
The result is ``{"value": ..., "expression": ...}``; integers beyond 2**53 (which a
JSON double cannot hold exactly) are given as decimal strings.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from hivewire.services.tool.sdk import ToolError, ToolOutput, tool

MAX_EXPRESSION_CHARS = 500
MAX_NODES = 200
MAX_EXPONENT = 10_000
MAX_INT_BITS = 4096
MAX_FACTORIAL = 1000
_SAFE_INTEGER = 2**53

Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}
"""Names an expression may use as numbers."""


def _factorial(value: Number) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise _error("factorial() needs an integer")
        value = int(value)
    if value < 0 or value > MAX_FACTORIAL:
        raise _error(f"factorial() takes an integer from 0 to {MAX_FACTORIAL}")
    return math.factorial(value)


def _gcd(a: Number, b: Number) -> int:
    if not (isinstance(a, int) and isinstance(b, int)):
        raise _error("gcd() needs integers")
    return math.gcd(a, b)


FUNCTIONS: dict[str, Callable[..., Number]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "atan2": math.atan2,
    "sinh": math.sinh,
    "cosh": math.cosh,
    "tanh": math.tanh,
    "floor": math.floor,
    "ceil": math.ceil,
    "hypot": math.hypot,
    "factorial": _factorial,
    "gcd": _gcd,
}
"""Functions an expression may call, by name (positional arguments only)."""


def _error(message: str, reason: str = "INVALID_EXPRESSION") -> ToolError:
    return ToolError(message, reason=reason, code="INVALID_ARGUMENT")


def _check_int(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _error(f"result exceeds {MAX_INT_BITS} bits", "RESULT_TOO_LARGE")
    if isinstance(value, float) and not math.isfinite(value):
        raise _error("result is not a finite number", "RESULT_NOT_FINITE")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise _error(f"exponent beyond ±{MAX_EXPONENT}", "RESULT_TOO_LARGE")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        # Estimate before computing: 2 ** 10000 is fine, 10 ** 10000 is not.
        if base not in (-1, 0, 1) and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
            raise _error(f"result exceeds {MAX_INT_BITS} bits", "RESULT_TOO_LARGE")
    result = operator.pow(base, exponent)
    if isinstance(result, complex):
        raise _error("result is a complex number", "RESULT_NOT_REAL")
    value: Number = result
    return value


class _Evaluator:
    def __init__(self) -> None:
        self.nodes = 0

    def eval(self, node: ast.AST) -> Number:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _error(f"expression has more than {MAX_NODES} parts", "EXPRESSION_TOO_LONG")
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise _error(f"{node.value!r} is not a number")
            return _check_int(node.value)
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise _error(f"unknown name {node.id!r}")
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _check_int(_UNARY[type(node.op)](self.eval(node.operand)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self.eval(node.left), self.eval(node.right)
            if isinstance(node.op, ast.Pow):
                return _check_int(_power(left, right))
            if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                    raise _error(f"result exceeds {MAX_INT_BITS} bits", "RESULT_TOO_LARGE")
            return _check_int(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                name = node.func.id if isinstance(node.func, ast.Name) else "this"
                raise _error(f"function {name!r} is not available")
            if node.keywords:
                raise _error("keyword arguments are not supported")
            args = [self.eval(arg) for arg in node.args]
            return _check_int(FUNCTIONS[node.func.id](*args))
        raise _error(f"{type(node).__name__} is not allowed in an arithmetic expression")


def evaluate(expression: str) -> Number:
    """Evaluate an arithmetic expression safely.

    Args:
        expression: For example ``"(2 + 3) * sqrt(16) / 4"``.

    Returns:
        The value (an int when exact integer arithmetic applies).

    Raises:
        ToolError: The expression is invalid, too long, or its result out of bounds.
    """
    text = expression.strip()
    if not text:
        raise _error("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise _error(
            f"expression longer than {MAX_EXPRESSION_CHARS} characters", "EXPRESSION_TOO_LONG"
        )
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise _error(f"invalid expression: {exc.msg}") from None
    return evaluate_tree(tree)


def evaluate_tree(tree: ast.AST) -> Number:
    """Evaluate an already parsed arithmetic expression safely, with the same bounds.

    Args:
        tree: An ``ast.Expression`` or expression node, e.g. from
            ``ast.parse(text, mode="eval")``.

    Returns:
        The value (an int when exact integer arithmetic applies).

    Raises:
        ToolError: A node that is not arithmetic, or a result out of bounds.
    """
    try:
        return _Evaluator().eval(tree)
    except ToolError:
        raise
    except ZeroDivisionError:
        raise _error("division by zero", "DIVISION_BY_ZERO") from None
    except (ValueError, OverflowError, TypeError) as exc:
        raise _error(f"cannot compute: {exc}", "MATH_ERROR") from None


@tool(name="calculator")
def calculator(
    expression: Annotated[str, Field(min_length=1, max_length=MAX_EXPRESSION_CHARS)],
) -> ToolOutput:
    """Evaluate an arithmetic expression exactly (integers) or in floating point.

    Supports + - * / // % ** (or ^), parentheses, pi, e, tau and the functions abs,
    round, min, max, sqrt, exp, log, log2, log10, sin, cos, tan, asin, acos, atan,
    atan2, sinh, cosh, tanh, floor, ceil, hypot, factorial and gcd.

    Args:
        expression: The expression, for example "(2 + 3) * sqrt(16) / 4".
    """
    value = evaluate(expression)
    # JSON numbers travel as doubles: integers beyond 2**53 go as exact decimal strings.
    exact = isinstance(value, int) and abs(value) >= _SAFE_INTEGER
    result: dict[str, Any] = {"value": str(value) if exact else value, "expression": expression}
    return ToolOutput(result=result, text=str(value))
