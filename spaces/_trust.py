"""Who may make slimtune import code: the trust rule.

slimtune imports a user's own code (a model factory, a data module) only from a reference
``package.module:name`` that the user gave it: on the command line, in a spec file or spec dict
they pass, or as a Python object. A reference that comes from *data* (the spec stored in a study
database, the manifest of a ``.slim`` file) names code that someone else may have written, so it
is imported only when its module is trusted explicitly: listed in the environment variable
``SLIMTUNE_TRUST`` (comma-separated module or package names) or passed with ``--trust MODULE``.
Presets need no import and are always allowed.

A reference carries where it came from as its *source*: ``None`` for the user's own input, else
a short description (``"the spec stored in study 'x'"``, ``"artifact model.slim"``).

Example:
    >>> require_trusted("mypkg.models:Net", "model.factory", source=None)  # the user's own spec
    >>> with trusting("mypkg"):
    ...     require_trusted("mypkg.models:Net", "model.factory", source="artifact a.slim")
    >>> try:
    ...     require_trusted("subprocess:getoutput", "model.factory", source="artifact a.slim")
    ... except UntrustedReference as err:
    ...     print(str(err).split(";")[0])
    model.factory: 'subprocess:getoutput' is named by artifact a.slim, and slimtune does not import code named by data
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ._errors import SpecError

TRUST_ENV = "SLIMTUNE_TRUST"


class UntrustedReference(SpecError):
    """A ``package.module:name`` read from data, whose module nobody has trusted."""

    def __init__(self, key: str, ref: str, source: str) -> None:
        module = module_of(ref)
        super().__init__(
            key, ref,
            f"pass --trust {module} (or set {TRUST_ENV}={module}) if you trust that code, or use a preset",
            f"is named by {source}, and slimtune does not import code named by data")


def module_of(ref: str) -> str:
    """The module part of ``package.module:name``.

    >>> module_of("mypkg.models:Net")
    'mypkg.models'
    """
    return ref.partition(":")[0]


def trusted_modules() -> tuple[str, ...]:
    """The modules and packages trusted by ``SLIMTUNE_TRUST`` (in this process and its children)."""
    return tuple(sorted({m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()}))


def is_trusted(ref: str) -> bool:
    """Whether ``ref``'s module, or a package it is in, is trusted."""
    module = module_of(ref)
    return any(module == t or module.startswith(t + ".") for t in trusted_modules())


def require_trusted(ref: str, key: str, source: str | None) -> None:
    """Return if ``ref`` may be imported (the user's own input, or a trusted module); else raise
    :class:`UntrustedReference` naming ``key``, ``source`` and how to trust it."""
    if source is not None and not is_trusted(ref):
        raise UntrustedReference(key, ref, source)


def trust(modules: Iterable[str]) -> None:
    """Trust ``modules`` for the rest of this process and the processes it starts (workers)."""
    names = set(trusted_modules()) | {m.strip() for m in modules if m.strip()}
    os.environ[TRUST_ENV] = ",".join(sorted(names))


@contextmanager
def trusting(*modules: str) -> Iterator[None]:
    """Trust ``modules`` for the length of the block only."""
    before = os.environ.get(TRUST_ENV)
    trust(modules)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = before
