"""The engine tests start the same real NBD servers as the client tests."""

from tests.client.conftest import servers

__all__ = ["servers"]
