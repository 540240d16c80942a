"""The Celery app of the workers. Settings come from server/settings.py (ERPD_*).

Reliability is the store's job, not the broker's (docs/architecture.md): a task claims its run in
the database, so whatever the broker redelivers runs at most once.
- acks_late + reject_on_worker_lost: a message is acknowledged only when its task returns, so a
  worker killed mid-run leaves it to be redelivered (and the reaper requeues the run anyway).
- prefetch 1, solo pool: one run at a time per worker, one worker per GPU.
- Redis visibility_timeout: an unacknowledged message is redelivered after it. It must exceed the
  longest run, or a healthy long run would be delivered to a second worker (whose claim then
  does nothing, but a GPU would sit waiting on it). 7 days. Redis only: the SQLAlchemy transport
  of the embedded default hands transport options to create_engine, which refuses the key (a
  message it loses with its worker is republished by the reaper through the outbox).
"""

from __future__ import annotations

from celery import Celery

from server.settings import get_settings

settings = get_settings()
WEEK_S = 7 * 24 * 3600
POLL_S = 0.05  # the embedded broker's polling interval

app = Celery("erpd-hub", broker=settings.broker, include=["worker.tasks", "worker.housekeeping"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue=settings.queue,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)
if settings.broker.startswith(("redis://", "rediss://")):
    app.conf.broker_transport_options = {"visibility_timeout": WEEK_S}
elif settings.broker.startswith("sqla+"):
    # the SQLAlchemy transport polls its table, once a second by default: a run would wait
    # 0.5 s on average before its worker saw it (measured: 679 ms median). The interval is
    # set on the class because this transport passes its options on to create_engine.
    from kombu.transport import sqlalchemy as sqla_transport

    sqla_transport.Transport.polling_interval = POLL_S
