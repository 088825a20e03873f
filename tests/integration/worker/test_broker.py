"""The worker's Redis transport on its own: an ack that Redis never got must not hold the
consumer's only prefetch slot (the fault behind a worker that sat idle after a Redis restart)."""

from __future__ import annotations

import pytest
from kombu import Connection, Exchange, Queue

from tests.integration.faults._stack import PrivateRedis
from worker.broker import TRANSPORT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("settle", ["ack", "reject"])
def test_unconfirmed_ack_frees_the_prefetch_slot(private_redis: PrivateRedis, settle: str) -> None:
    queue = Queue("broker-ack-test", Exchange("broker-ack-test"), routing_key="broker-ack-test")
    with Connection(private_redis.url, transport=TRANSPORT) as connection:
        channel = connection.channel()
        channel.basic_qos(0, 1, False)  # prefetch 1, as the workers run
        producer = connection.Producer(channel)
        producer.publish(
            {"job": "x"}, exchange=queue.exchange, routing_key="broker-ack-test", declare=[queue]
        )
        message = queue(channel).get(no_ack=False)
        assert message is not None
        assert not channel.qos.can_consume()  # the one slot is taken until the message is settled

        private_redis.stop()  # Redis restarts while the job runs
        with pytest.raises(connection.connection_errors):
            getattr(message, settle)()
        assert channel.qos.can_consume(), "the unconfirmed message still holds the slot"
