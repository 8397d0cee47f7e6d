"""The method registry: adding a pruning method is one module and one ``@register``.

Each registered class carries a one-line ``summary`` (shown by ``bs.methods()``) and a docstring
that cites its paper and gives the formula it computes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

from .errors import BrainsurgeonError

if TYPE_CHECKING:  # pragma: no cover
    from .pruners.base import PruningMethod

_REGISTRY: dict[str, type["PruningMethod"]] = {}
# (name, structure) -> the class implementing method `name` for that structure when the registered
# class does not (C-OBD is `obd` with structure="channel"): one public name per method.
_VARIANTS: dict[tuple[str, str], type["PruningMethod"]] = {}
M = TypeVar("M")


def register(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`PruningMethod` subclass under ``name``."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        if not getattr(cls, "summary", ""):
            raise ValueError(f"method {name!r} needs a one-line `summary`")
        if not (cls.__doc__ or "").strip():
            raise ValueError(f"method {name!r} needs a docstring citing its paper and formula")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def register_variant(name: str, structure: str) -> Callable[[M], M]:
    """Class decorator: implement the registered method ``name`` for ``structure``.

    Used where one method of the literature has a structured form (OBD -> C-OBD, K-FAC OBS ->
    C-OBS): users keep calling ``method="obd"``, and ``structure="channel"`` selects the variant.
    """

    def deco(cls):
        key = (name, structure)
        if key in _VARIANTS:
            raise ValueError(f"method {name!r} has two {structure!r} variants ({_VARIANTS[key]} and {cls})")
        if not (cls.__doc__ or "").strip() or not getattr(cls, "summary", ""):
            raise ValueError(f"the {structure!r} variant of {name!r} needs a docstring and a summary")
        cls.name = name
        _VARIANTS[key] = cls
        return cls

    return deco


def get_variant(name: str, structure: str) -> type["PruningMethod"] | None:
    """The class implementing ``name`` for ``structure`` if it is a registered variant, else None."""
    _load_builtin()
    return _VARIANTS.get((name, structure))


def supports(name: str, structure: str) -> bool:
    """Whether method ``name`` can prune with ``structure`` ("unstructured", "channel")."""
    _load_builtin()
    cls = _REGISTRY.get(name)
    return (name, structure) in _VARIANTS or (cls is not None and structure in cls.structures)


def _load_builtin() -> None:
    # Importing the pruners package registers every built-in method (it is not named
    # `methods`: that would shadow `bs.methods()` on the package).
    import importlib

    importlib.import_module("brainsurgeon.pruners")
    # structured methods import pruners.base themselves: importing them from pruners/__init__ would be circular
    importlib.import_module("brainsurgeon.structured.methods")  # structure="channel" criteria


def get_method(name: str) -> type["PruningMethod"]:
    _load_builtin()
    if not isinstance(name, str) or name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise BrainsurgeonError(f"unknown method {name!r}; registered methods are: {known}")
    return _REGISTRY[name]


def methods() -> dict[str, str]:
    """``{name: one-line description}`` of every registered method."""
    _load_builtin()
    return {name: cls.summary for name, cls in sorted(_REGISTRY.items())}
