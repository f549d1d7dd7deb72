"""Named registries: each variant (advantage estimator, policy loss, loss aggregation, KL estimator, preference loss,
algorithm) is registered once under its name, and config options are checked against the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from alignrl.errors import AlignRLError

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> entry; `what` names the kind of entry in error messages."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated function (or class) under `name`."""

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise AlignRLError(f"unknown {self.what} {name!r}; valid: {', '.join(self._entries)}") from None

    def check(self, option: str, name: str) -> None:
        """Config check: `option: name` must be a registered entry."""
        if not isinstance(name, str) or name not in self._entries:
            raise AlignRLError(f"{option}: unknown {self.what} {name!r} (choose from {', '.join(self._entries)})")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)
