import secrets

import pytest


@pytest.fixture
def hub_server():
    """A test-only loopback Hub (tests/hub_server.py) with a random token; stopped at teardown."""
    from hub_server import HubServer

    with HubServer(token=f"hf_test{secrets.token_hex(12)}", lifetime_s=120) as server:
        yield server
