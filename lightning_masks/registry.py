"""A named registry, the idiom of timm's ``_registry.py``: register with a decorator, look up by name (a miss names
the registered entries), list the names. Initializers, schedule shapes, importance criteria and layer kinds each
keep theirs in one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        kind: what an entry is, for messages (``"schedule"``, ``"importance"``).
        hint: appended to the message of a lookup miss (e.g. what else may be passed).

    Example:
        >>> shapes = Registry("shape")
        >>> _ = shapes.add("linear", lambda p: p)
        >>> shapes.get("linear")(0.5), shapes.names()
        (0.5, ['linear'])
    """

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, *, override: bool = False) -> T:
        """Register ``entry`` under ``name`` and return it.

        Raises:
            ValueError: ``name`` is registered already and ``override`` is False.
        """
        if name in self._entries and not override:
            raise ValueError(f"{self.kind} {name!r} is registered already; pass override=True to replace it")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str, *, override: bool = False,
                  wrap: Callable[[T], T] = lambda entry: entry) -> Callable[[T], T]:
        """A decorator that registers ``wrap(entry)`` under ``name`` and returns the entry unchanged."""

        def register(entry: T) -> T:
            self.add(name, wrap(entry), override=override)
            return entry

        return register

    def get(self, name: str) -> T:
        """Return the entry registered as ``name``.

        Raises:
            ValueError: an unknown name, listing the registered ones.
        """
        try:
            return self._entries[name]
        except KeyError:
            hint = f". {self.hint}" if self.hint else ""
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {self.names()}{hint}") from None

    def find(self, name: str) -> T | None:
        """The entry registered as ``name``, or ``None``."""
        return self._entries.get(name)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (e.g. an entry registered for a test)."""
        del self._entries[name]
