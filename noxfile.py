"""The test matrix: the whole suite on the newest releases, the model and generation tests on the oldest we claim.

    pip install nox && nox            # both legs, each in a fresh virtual environment (what `.ci/run` runs)
    nox -s newest -- -k cache         # one leg, extra arguments go to pytest

transformers and huggingface_hub move fastest under us (5.24 renamed the cache argument `generate` passes and silently
broke cached decoding), so the oldest leg pins the versions of the GPU image, the lower bounds in pyproject.toml:
transformers 5.17 and huggingface_hub 1.33 (5.17 needs hub < 2). torch is the CPU wheel in both legs. Each leg prints
the versions it ran in pytest's header.
"""

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["newest", "oldest"]
nox.options.error_on_missing_interpreters = True

TORCH = "torch==2.13.0"  # the CPU wheel (any other pulls a multi-GB CUDA build)
OLDEST = ["transformers==5.17.0", "huggingface_hub==1.33.0"]
# what the oldest leg must prove: the models, caching and generate under every strategy, remote code, sessions,
# configs, the Hub round trip and the CLI self-check
OLDEST_TESTS = ["tests/test_rat.py", "tests/test_rxt.py", "tests/test_rxt_session.py", "tests/test_configs.py",
                "tests/test_hub.py", "tests/test_tokenization.py", "tests/test_cli.py", "tests/test_chat_cli.py",
                "tests/test_graph_decode.py", "tests/test_gating.py", "tests/test_rat_fast_paths.py"]


@nox.session
def newest(session: nox.Session) -> None:
    """Whole suite on the newest releases the registry serves."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def oldest(session: nox.Session) -> None:
    """Model, generation, Hub and CLI tests on the oldest transformers / huggingface_hub we claim."""
    session.install(TORCH)
    session.install("-e", ".[test]", *OLDEST)
    session.run("python", "-m", "pytest", "-q", *(session.posargs or OLDEST_TESTS))
