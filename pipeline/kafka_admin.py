"""Topic creation: the third and last module that imports kafka-python (with source and sink)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.config import KafkaSettings
from pipeline.errors import BrokerError

log = logging.getLogger(__name__)


def client_options(kafka: KafkaSettings) -> dict[str, object]:
    """Connection options shared by consumers, producers and the admin client."""
    opts: dict[str, object] = {
        "bootstrap_servers": (kafka.bootstrap_servers or "").split(","),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.sasl_mechanism:
        opts["sasl_mechanism"] = kafka.sasl_mechanism
        opts["sasl_plain_username"] = kafka.sasl_username
        opts["sasl_plain_password"] = (
            kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
        )
    return opts


def probe(kafka: KafkaSettings, timeout_s: float = 2.0) -> None:
    """Raise BrokerError unless a TCP connection to some bootstrap server opens in time.

    A cheap first check: kafka-python's clients block for ~30 s on an unreachable cluster.
    """
    servers = (kafka.bootstrap_servers or "").split(",")
    errors = []
    for server in servers:
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout_s):
                return
        except (OSError, ValueError) as exc:
            errors.append(f"{server}: {exc}")
    raise BrokerError(f"no bootstrap server reachable ({'; '.join(errors)})")


def ensure_topics(
    kafka: KafkaSettings,
    topics: Iterable[str],
    partitions: int | None = None,
    configs: dict[str, str] | None = None,
) -> list[str]:
    """Create those of ``topics`` that do not exist; returns the names created."""
    try:
        admin = KafkaAdminClient(**client_options(kafka), request_timeout_ms=10_000)
    except KafkaError as exc:
        raise BrokerError(
            f"cannot reach Kafka at {kafka.bootstrap_servers} ({exc}); check "
            "--bootstrap-servers / kafka.bootstrap_servers"
        ) from exc
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        new = [
            NewTopic(
                t,
                partitions or kafka.partitions,
                kafka.replication_factor,
                topic_configs=configs or {},
            )
            for t in wanted
        ]
        created: list[str] = []
        for topic in new:
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info(
                "event=topics_created topics=%s partitions=%s", ",".join(created), kafka.partitions
            )
        return created
    finally:
        admin.close()


def partitions_of(kafka: KafkaSettings, topic: str) -> int:
    """Number of partitions of ``topic`` (0 if it does not exist)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(**client_options(kafka))
    try:
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        consumer.close()
