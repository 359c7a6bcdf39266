import secrets
from importlib import metadata

import pytest

PACKAGES = ["torch", "transformers", "huggingface_hub", "accelerate", "peft", "trl", "datasets", "tokenizers"]


def versions_line() -> str:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return "versions: " + ", ".join(versions)


def pytest_sessionstart(session):
    """Which versions this run tested (each leg of the CI matrix prints its own), also under `-q`, which hides the
    report header."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(versions_line())


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, so a second thread on a busy 2-core machine only adds
    synchronisation (several times slower). Files use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_server():
    """A test-only loopback Hub (tests/hub_server.py) with a random token; stopped at teardown."""
    from hub_server import HubServer

    with HubServer(token=f"hf_test{secrets.token_hex(12)}", lifetime_s=120) as server:
        yield server
