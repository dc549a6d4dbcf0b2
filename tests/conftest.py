"""Command-line options shared by the test suite."""

from __future__ import annotations

import pytest

from stage_slowdown import parse_slowdown


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slowdown", default="", metavar="STAGE=MS[,STAGE=MS]",
                     help="latency tests only: sleep MS ms per frame inside each named pipeline stage "
                          "(e.g. 3.unet=5) to show that the regression test fails")


@pytest.fixture(scope="session")
def slowdown(request: pytest.FixtureRequest) -> dict[str, float]:
    """The ``--slowdown`` option parsed into ``{stage: ms per frame}`` (empty when not given)."""
    try:
        return parse_slowdown(request.config.getoption("--slowdown"))
    except ValueError as exc:
        raise pytest.UsageError(f"--slowdown: {exc}") from exc


@pytest.fixture(scope="module")
def one_cpu_thread():
    """torch on one intra-op thread for a module: the tiny models gain nothing from intra-op
    threads, and on 2-vCPU CI VMs two threads ran 10x slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
