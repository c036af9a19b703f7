"""The plugin registry's test helpers: a name registered for a block is gone after it, whatever happened."""

from __future__ import annotations

import pytest


def test_registry_registered_is_undone_even_on_error():
    from benchmark.errors import UserError
    from benchmark.registry import Registry

    reg: Registry[object] = Registry("widget", group="forgetbench.test-widgets")
    thing = object()
    try:
        with reg.registered("thing", thing):
            assert reg.get("thing") is thing and reg.origin("thing") == "test"
            raise RuntimeError("a failing test body")
    except RuntimeError:
        pass
    assert "thing" not in reg
    with pytest.raises(UserError, match="thing"):
        reg.get("thing")
    reg.unregister("thing")  # unregistering what is not there is a no-op
