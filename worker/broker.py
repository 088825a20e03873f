"""The worker's Redis transport: kombu's own, except that an acknowledgement Redis never received
does not stop the worker from taking the next job.

kombu's Redis QoS forgets a delivered message only once Redis confirms the ack. If Redis is down
at that moment (it restarted while a job ran), the ack raises, Celery logs "Couldn't ack" and
carries on, but the message still counts as unacknowledged: with prefetch 1 the channel never asks
Redis for another message, and the worker sits idle for good while jobs wait in the queue. Here
the message is forgotten locally either way, so the consumer polls again, finds the broken
connection and reconnects. Whatever copy Redis kept comes back after the visibility timeout, and
the DB claim makes that second delivery harmless.
"""

from __future__ import annotations

from celery import Celery
from kombu.transport import redis, virtual

TRANSPORT = "worker.broker:Transport"


class QoS(redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except self.channel.connection_errors:
            virtual.QoS.ack(self, delivery_tag)
            raise

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except self.channel.connection_errors:
            virtual.QoS.ack(self, delivery_tag)
            raise


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel


def use_in(app: Celery) -> None:
    """Consume through this transport when the broker is Redis (other brokers are left alone)."""
    if str(app.conf.broker_url).startswith("redis://"):
        app.conf.broker_transport = TRANSPORT
