"""Unit conversion tools for hivewire agents: a complete example plugin.

Two tools:

- ``convert_units``: one value from one unit to another (a plain synchronous function:
  the service runs it on a thread of its own).
- ``convert_many``: a list of values, reporting progress and stopping when the call is
  cancelled (shows :class:`ToolContext`).

The arguments' JSON Schema comes from the type hints (``Literal`` becomes an ``enum``,
``Annotated[..., Field(...)]`` adds bounds), descriptions from the docstring's ``Args:``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from hivewire.services.tool.sdk import ToolContext, ToolError, tool

Unit = Literal["m", "km", "mi", "ft", "in", "g", "kg", "lb", "oz", "c", "f", "k"]

# Factor to the base unit of each dimension (metre, gram); temperatures are special.
_LENGTH = {"m": 1.0, "km": 1000.0, "mi": 1609.344, "ft": 0.3048, "in": 0.0254}
_MASS = {"g": 1.0, "kg": 1000.0, "lb": 453.59237, "oz": 28.349523125}
_TEMPERATURE = {"c", "f", "k"}


class Conversion(BaseModel):
    """The converted value."""

    value: float
    unit: str


def _to_kelvin(value: float, unit: str) -> float:
    if unit == "c":
        return value + 273.15
    if unit == "f":
        return (value - 32) * 5 / 9 + 273.15
    return value


def _from_kelvin(value: float, unit: str) -> float:
    if unit == "c":
        return value - 273.15
    if unit == "f":
        return (value - 273.15) * 9 / 5 + 32
    return value


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Convert ``value`` between two units of the same dimension.

    Raises:
        ToolError: The units measure different things (reason ``INCOMPATIBLE_UNITS``).
    """
    for table in (_LENGTH, _MASS):
        if from_unit in table and to_unit in table:
            return value * table[from_unit] / table[to_unit]
    if from_unit in _TEMPERATURE and to_unit in _TEMPERATURE:
        kelvin = _to_kelvin(value, from_unit)
        if kelvin < 0:
            raise ToolError(
                f"{value} {from_unit} is below absolute zero",
                reason="BELOW_ABSOLUTE_ZERO",
                code="INVALID_ARGUMENT",
            )
        return _from_kelvin(kelvin, to_unit)
    # A classified error: the caller (often a model) reads the reason and the message.
    raise ToolError(
        f"cannot convert {from_unit} to {to_unit}: they measure different things",
        reason="INCOMPATIBLE_UNITS",
        code="INVALID_ARGUMENT",
    )


@tool(version="0.1.0")
def convert_units(value: float, from_unit: Unit, to_unit: Unit) -> Conversion:
    """Convert a quantity between units of length, mass or temperature.

    Args:
        value: The quantity to convert.
        from_unit: Its unit: m, km, mi, ft, in, g, kg, lb, oz, c, f or k.
        to_unit: The unit wanted (same dimension as from_unit).
    """
    return Conversion(value=round(convert(value, from_unit, to_unit), 6), unit=to_unit)


@tool(version="0.1.0")
def convert_many(
    values: Annotated[list[float], Field(min_length=1, max_length=10_000)],
    from_unit: Unit,
    to_unit: Unit,
    ctx: ToolContext,
) -> list[float]:
    """Convert many quantities at once, reporting progress.

    Args:
        values: The quantities.
        from_unit: Their unit.
        to_unit: The unit wanted.
    """
    out = []
    for index, value in enumerate(values):
        # Sync tools cannot be interrupted: check between steps so a cancelled or
        # timed-out call stops promptly instead of finishing unseen.
        ctx.check_cancelled()
        out.append(round(convert(value, from_unit, to_unit), 6))
        if index % 1000 == 0:
            ctx.progress(index / len(values), "convert", f"{index}/{len(values)}")
    return out
