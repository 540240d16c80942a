"""Publishing run messages to the Celery broker, by task name (the API never imports the worker,
whose tasks import torch). A message carries the run id only; the worker re-reads the run.

Every call is bounded by `timeout` (seconds): connecting, and each socket read, so a broker that
accepts connections but never answers (a frozen Redis) costs a caller at most a few timeouts,
never a hang. Publishing never retries: the outbox (server/services/outbox.py) does."""

from __future__ import annotations

import uuid

from celery import Celery
from kombu.exceptions import ChannelError

# the worker registers its task under this name (worker/tasks.py)
RUN_STAGE_TASK = "erpd.run_stage"


class BrokerUnavailableError(Exception):
    """The broker cannot be reached: the API answers 503 and creates nothing."""


class Broker:
    def __init__(
        self, url: str, queue: str, housekeeping: str = "cpu", *, timeout: float = 3.0
    ) -> None:
        self.queue = queue
        self.housekeeping = housekeeping  # tasks that need no GPU: webhooks
        self.timeout = timeout
        self.app = Celery("erpd-hub-api", broker=url, set_as_current=False)
        self.app.conf.update(
            broker_connection_timeout=timeout,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
        )
        # one connection attempt per call (kombu's default retries it for `timeout` seconds)
        options: dict[str, float] = {"max_retries": 0}
        if url.startswith(("redis://", "rediss://")):
            # kombu's default socket timeout is None: a frozen Redis would block a call forever
            options |= {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        self.app.conf.broker_transport_options = options

    def ping(self) -> None:
        """One round trip to the broker (a Redis PING), not only a connect: a frozen server
        accepts connections."""
        try:
            with self.app.connection_for_write() as conn:
                client = getattr(conn.default_channel, "client", None)  # connects, once
                if client is not None:
                    client.ping()
        except Exception as exc:  # kombu/redis/socket errors alike mean "unreachable"
            raise BrokerUnavailableError(f"broker unreachable: {exc}") from exc

    def run_queue(self, gpu: int | None = None) -> str:
        """The run queue, or `<queue>.N` for runs pinned to GPU N."""
        return self.queue if gpu is None else f"{self.queue}.{gpu}"

    def publish(self, run_id: uuid.UUID, gpu: int | None = None) -> None:
        try:
            self.app.send_task(
                RUN_STAGE_TASK, args=[str(run_id)], queue=self.run_queue(gpu), retry=False
            )
        except Exception as exc:
            raise BrokerUnavailableError(f"broker unreachable: {exc}") from exc

    def notify(self, run_id: uuid.UUID) -> None:
        """Queue the run-finished webhook for the housekeeping (`cpu`) workers."""
        from server.services.webhooks import NOTIFY_TASK

        try:
            self.app.send_task(
                NOTIFY_TASK, args=[str(run_id)], queue=self.housekeeping, retry=False
            )
        except Exception as exc:
            raise BrokerUnavailableError(f"broker unreachable: {exc}") from exc

    def depth(self, queue: str | None = None) -> int | None:
        """Messages waiting on `queue` (default: the run queue); None when the broker cannot
        say."""
        try:
            with self.app.connection_for_read() as conn:
                channel = conn.default_channel
                declared = channel.queue_declare(queue=queue or self.queue, passive=True)
                return int(declared.message_count)
        except ChannelError:  # never declared (no worker consumed it yet, nothing sent): empty
            return 0
        except Exception:
            return None

    def run_queue_depth(self, gpu: int | None = None) -> int | None:
        return self.depth(self.run_queue(gpu))

    def close(self) -> None:
        self.app.close()
