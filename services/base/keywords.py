"""Keyword arguments gathered in a ``TypedDict`` (``**options: Unpack[Options]``).

A type checker refuses a keyword such a function does not take; :func:`check_keywords`
makes a caller that is not type checked fail the same way, at once, instead of having a
misspelt option ignored.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

__all__ = ["check_keywords"]


def check_keywords(function: str, given: Mapping[str, object], known: Collection[str]) -> None:
    """Refuse a keyword argument ``function`` does not take, as Python itself would.

    Args:
        function: The function's qualified name, for the message.
        given: The keywords it received.
        known: The keys it takes (``Options.__optional_keys__``).

    Raises:
        TypeError: ``given`` has a key outside ``known``.
    """
    for name in given:
        if name not in known:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
