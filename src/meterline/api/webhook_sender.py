"""Sends due outbox rows to their webhook endpoints, signed per Standard Webhooks (``webhook-id``,
``webhook-timestamp``, ``webhook-signature``), retrying with backoff (``meterline.alerts.delivery``).

A delivery whose signing secret was sealed with a data key the key file lacks (a wrong or older copy of
the file in place) is not the receiver's failure: it does not use up an attempt and is retried at the
backoff's longest interval for as long as the key is missing, so it goes out once the right file is back."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import httpx
from standardwebhooks import Webhook

from meterline.alerts import check_url, retry_delay
from meterline.alerts.destinations import Resolver, resolve
from meterline.clock import Clock, SystemClock, to_micros
from meterline.encryption import MissingDataKey, SealError
from meterline.errors import InvalidRequest
from meterline.storage.webhook_store import Delivery, SqlWebhookStore

log = logging.getLogger("meterline.webhooks")
LEASE_S = 60


class _Postpone(Exception):
    """The attempt could not be made for a reason of ours: given back, not counted."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class WebhookSender:
    """``clock`` schedules attempts (tests move it); ``wall_clock`` stamps the signature, which receivers
    check against their own time (a replay window), so it is always the real time."""

    def __init__(
        self,
        store: SqlWebhookStore,
        clock: Clock,
        *,
        allow_private: bool,
        timeout_s: float,
        max_attempts: int,
        wall_clock: Clock | None = None,
        resolver: Resolver = resolve,
        retry_delay_s: Callable[[int], int] = retry_delay,
    ) -> None:
        self._store = store
        self._clock = clock
        self._wall = wall_clock or SystemClock()
        self._allow_private = allow_private
        self._max_attempts = max_attempts
        self._resolver = resolver
        self._retry_delay_s = retry_delay_s
        # Never follow redirects: a public URL could otherwise send us to a private one.
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def deliver_due(self) -> int:
        """One pass over due rows; the number delivered."""
        now = self._clock.now()
        now_us = to_micros(now)
        sent = 0
        for delivery in self._store.due(now_us, self._max_attempts):
            if not self._store.claim(delivery, now_us + LEASE_S * 1_000_000):
                continue  # another sender has this attempt
            try:
                error = self._attempt(delivery)
            except _Postpone as postponed:
                later = to_micros(self._clock.now()) + self._longest_delay_s() * 1_000_000
                self._store.postponed(delivery, postponed.error, later)
                continue
            if error is None:
                self._store.delivered(delivery.id, to_micros(self._clock.now()))
                sent += 1
                continue
            attempts = delivery.attempts + 1
            retry_at = None
            if attempts < self._max_attempts:
                retry_at = to_micros(self._clock.now()) + self._retry_delay_s(attempts) * 1_000_000
            self._store.failed(delivery.id, error, retry_at)
        return sent

    def _longest_delay_s(self) -> int:
        """The longest wait of the backoff: the one before the last attempt."""
        return self._retry_delay_s(max(1, self._max_attempts - 1))

    def _attempt(self, delivery: Delivery) -> str | None:
        """Send once; None on a 2xx, else what went wrong (``_Postpone``: not attempted, not counted)."""
        try:
            # Again at delivery: the name may resolve elsewhere since registration (DNS rebinding).
            check_url(delivery.url, allow_private=self._allow_private, resolver=self._resolver)
        except InvalidRequest as exc:
            return exc.message
        try:
            secret = self._store.secret_of(delivery)
        except MissingDataKey as exc:
            # Restoring the key file that holds the data key repairs it: waiting never uses up attempts.
            delay = self._longest_delay_s()
            log.error(
                "webhook %s to endpoint %s not sent: its signing secret cannot be decrypted: %s; not "
                "counted as an attempt, tried again in %d s",
                delivery.id,
                delivery.endpoint_id,
                exc,
                delay,
            )
            raise _Postpone(
                f"signing secret cannot be decrypted: {exc}; not counted as an attempt, tried every {delay} s"
            ) from None
        except SealError as exc:
            # Altered, or copied from another row: counted and retried like any failure.
            log.error(
                "webhook %s to endpoint %s not sent: its signing secret cannot be decrypted: %s",
                delivery.id,
                delivery.endpoint_id,
                exc,
            )
            return f"signing secret cannot be decrypted: {exc}"
        stamp = self._wall.now()
        headers = self.signed_headers(delivery, secret, stamp)
        try:
            response = self._http.post(delivery.url, content=delivery.payload_json.encode(), headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    @staticmethod
    def signed_headers(delivery: Delivery, secret: str, stamp: datetime) -> dict[str, str]:
        signature = Webhook(secret).sign(delivery.id, stamp, delivery.payload_json)
        return {
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(stamp.timestamp())),
            "webhook-signature": signature,
            "user-agent": "meterline-webhooks",
        }
