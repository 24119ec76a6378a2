"""The public API of capi_client is exactly __all__, sorted."""

from __future__ import annotations

import types

import capi_client


def test_all_imports_are_exported() -> None:
    public = [
        name
        for name, value in vars(capi_client).items()
        # Submodules (cli, examples) show up once something imports them.
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    ]
    assert capi_client.__all__ == sorted(public)
