"""Classes with no public constructor: only their factory makes them (like trio's own).

``class MapStream(Generic[T], metaclass=NoPublicConstructor)`` with ``_factory =
"conveyor.map(fn, items, ...)"``: calling ``MapStream(...)`` raises a TypeError that names
the factory; the factory makes one with ``MapStream._create(...)``, which runs the class's
own ``__init__``. Put ``@typing.final`` on such a class too: nothing else makes one, so
nothing should extend it.
"""

from __future__ import annotations

from typing import NoReturn, TypeVar

__all__ = ["NoPublicConstructor"]

T = TypeVar("T")


class NoPublicConstructor(type):
    """Metaclass: calling the class raises TypeError naming its ``_factory``; ``_create``
    is the private way in."""

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        factory = getattr(cls, "_factory", "its factory function")
        raise TypeError(
            f"conveyor.{cls.__qualname__} has no public constructor: call {factory}, which "
            f"returns one"
        )

    def _create(cls: type[T], *args: object, **kwargs: object) -> T:
        """Make an instance (the factory's path): ``cls.__init__(*args, **kwargs)``."""
        return super().__call__(*args, **kwargs)  # type: ignore[misc, no-any-return]
