"""The guarded wrapping every hook on vLLM goes through."""

from __future__ import annotations

import inspect


def patch(owner, name: str, make) -> bool:
    """Replace ``owner.name`` by ``make(original)``, once per process.

    ``owner`` is a class or a module; the attribute may be a function, a
    property (its getter is wrapped) or a classmethod (its function is
    wrapped). The replacement is marked, so a second call is a no-op (False),
    and keeps the original as ``__wrapped__``."""
    raw = inspect.getattr_static(owner, name)
    if isinstance(raw, property):
        original = raw.fget
    elif isinstance(raw, classmethod):
        original = raw.__func__
    else:
        original = raw
    if getattr(original, "_adadecode", False):
        return False
    new = make(original)
    new._adadecode = True
    new.__wrapped__ = original
    if isinstance(raw, property):
        new = property(new, doc=raw.__doc__)
    elif isinstance(raw, classmethod):
        new = classmethod(new)
    setattr(owner, name, new)
    return True
