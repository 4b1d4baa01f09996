"""Backends are chosen from registries by name: a new backend is one new file and one registry line."""

from __future__ import annotations

from importlib import import_module
from typing import Any


def load_factory(target: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute (imports happen only here)."""
    module_name, _, attribute = target.partition(":")
    return getattr(import_module(module_name), attribute)
