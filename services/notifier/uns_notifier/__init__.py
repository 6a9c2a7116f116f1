"""``uns run notifier``: anomaly events become work orders on a webhook, one per fault.

Decisions (what the issue left open), the way ServiceNow, PagerDuty and Opsgenie
integrations settle them; the README's "notifier" section says the same:

* **Idempotency**: a work order's key is the event id (a line incident's: its first
  event's id + ``-storm``). The state file (``state_file``) maps every event id seen to
  its work order and keeps the receiver's record id (ServiceNow: the ``sys_id`` of the
  create), so a restart or a re-delivered event never opens a second. Each request
  carries ``Idempotency-Key`` (the open's: the key; operation n's: ``key:n``), so a
  request sent again after a crash in the middle is recognisable; the ServiceNow preset
  also looks the incident up by ``correlation_id`` before opening it.
* **Storms** (``correlate_s`` = 30 s, ``correlate_min`` = 5): a raise is held up to
  ``correlate_s`` from its line's first held raise; ``correlate_min`` distinct devices of
  one line (``enterprise/site/area/line``) in that window open one line incident at once
  with their events attached, and later raises on the line while it is open are attached
  to it (an update). A window ending with fewer devices gives each fault its own work
  order. A fault's work order thus comes up to ``correlate_s`` after its raise.
* **Clears**: a device work order is resolved by its event's clear; a line incident gets
  an update per clear and is resolved when its last event has cleared.
* **Delivery**: operations go through `uns.journal` (the bridge's SQLite journal) in
  order, one at a time; 2xx delivered; 429, 408, 5xx, connection errors and timeouts back
  off (doubling from ``retry_min_s`` to ``retry_max_s``, jittered; ``Retry-After``
  honoured up to 1 h); 401/403 back off too (the credential is wrong, not the work order:
  dead-lettering would throw every work order away while a token is expired); any other
  4xx is a dead letter (``uns_notifier_dead_letters_total``, the answer logged once) and
  the next operation goes on. Nothing is lost while the webhook is down for less than
  ``journal.ttl_s`` (7 days).
* **Events**: ``kinds`` (``anomaly``) at ``min_severity`` (``warning``) or above; an
  ``info`` event (the simulator's ground truth) is no fault.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_notifier.correlate import Correlator, Op, State
    from uns_notifier.service import Notifier
    from uns_notifier.settings import NotifierSettings, Webhook

__all__ = ["Correlator", "Notifier", "NotifierSettings", "Op", "State", "Webhook"]

__getattr__ = lazy_exports(
    __name__,
    {
        "Correlator": "correlate",
        "Notifier": "service",
        "NotifierSettings": "settings",
        "Op": "correlate",
        "State": "correlate",
        "Webhook": "settings",
    },
)
