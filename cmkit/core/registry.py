"""A name -> object table with one-line errors: how solvers, objectives, distances, weightings, datasets and
backbones are found by name, so a new one is a new file plus one ``@REGISTRY.register("name")`` line."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what  # how errors name the key, e.g. "objective.kind"
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """``REGISTRY.register("name", obj)``, or as a decorator ``@REGISTRY.register("name")``."""
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._items[name] = obj
            return obj
        return add(item) if item is not None else add

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            hint = difflib.get_close_matches(str(name), list(self._items), n=1, cutoff=0.5)
            raise ValueError(f"unknown {self.what} {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                             + f" (known: {', '.join(self._items)})") from None

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()
