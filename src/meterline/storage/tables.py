"""The schema, as SQLAlchemy Core tables. Alembic migrations (``migrations/``) create exactly this.

Conventions that keep SQLite and PostgreSQL identical and fast:
* timestamps are integer microseconds since the epoch (``*_us``): exact, sortable, bucketable in SQL;
* money and credits are integer nanos (``*_nanos``), see ``meterline.money``;
* rollup dimensions use '' rather than NULL so that they can be part of a unique key (NULLs never
  collide in a unique index, which would break the upsert).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

from meterline.metering.records import VECTOR_COUNTS

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only makes an INTEGER PRIMARY KEY an alias of the rowid (auto-increment, no extra index).
AutoId = BigInteger().with_variant(Integer(), "sqlite")

organizations = Table(
    "organizations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("plan", String(64), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("spend_cap_nanos", BigInteger, nullable=True),
    Column("billing_anchor_day", Integer, nullable=False),
    Column("discount_pct", Integer, nullable=False, default=0),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    # Usage-alert thresholds (percent of the allowance or cap), comma-separated; NULL: the deployment's.
    Column("alert_thresholds", String(200), nullable=True),
)

workspaces = Table(
    "workspaces",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("organization_id", String(40), ForeignKey("organizations.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("group_name", String(200), nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("organization_id", String(40), ForeignKey("organizations.id"), nullable=False, index=True),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("key_prefix", String(32), nullable=False, index=True),
    # SHA-256 of the whole key: keys are 256-bit random, so a fast hash is safe and lookups stay O(1).
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("scope", String(16), nullable=False),
    Column("default_source", String(32), nullable=True),
    Column("limits_json", Text, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    Column("last_used_at_us", BigInteger, nullable=True),
    Column("revoked_at_us", BigInteger, nullable=True),
)

identifiers = Table(
    "identifiers",
    metadata,
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("identifier_id", String(200), nullable=False),
    Column("organization_id", String(40), ForeignKey("organizations.id"), nullable=False, index=True),
    Column("limits_json", Text, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    PrimaryKeyConstraint("workspace_id", "identifier_id"),
)

credit_grants = Table(
    "credit_grants",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("organization_id", String(40), ForeignKey("organizations.id"), nullable=False, index=True),
    Column("credits_nanos", BigInteger, nullable=False),
    Column("reason", String(500), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
)

# Credits drawn per organization and billing period, by bucket. A projection of the ledger (its
# ``credits_*_nanos`` columns) kept in the settle transaction, so that splitting the next row between the
# monthly and the bonus bucket is one small indexed read, and bonus left = grants - all bonus drawn.
credit_usage = Table(
    "credit_usage",
    metadata,
    Column("organization_id", String(40), nullable=False),
    Column("period_start_us", BigInteger, nullable=False),
    Column("monthly_nanos", BigInteger, nullable=False),
    Column("bonus_nanos", BigInteger, nullable=False),
    Column("overage_nanos", BigInteger, nullable=False),
    PrimaryKeyConstraint("organization_id", "period_start_us"),
)

# Reservations that must survive a crash (two-phase requests): deleted in the transaction that writes
# their ledger row; whatever is left after a crash or past its lease is settled at its estimate.
reservations = Table(
    "reservations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("organization_id", String(40), nullable=False, index=True),
    Column("estimate_json", Text, nullable=False),
    Column("meters_json", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("expires_at_us", BigInteger, nullable=False, index=True),
    # What the work has consumed so far (a stream publishes it as it goes); the settle replaces it.
    Column("progress_credits_nanos", BigInteger, nullable=False, server_default="0"),
    Column("progress_cost_nanos", BigInteger, nullable=False, server_default="0"),
)

# Work that could not be settled (recovery or a live settle failed for a reason a retry cannot fix): kept
# whole with its error until an operator settles or voids it, so that it neither blocks the rest of the
# queue nor is lost. ``record_json`` is the usage as the reservation held it (JSON escapes keep any NUL).
quarantine = Table(
    "quarantine",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("organization_id", String(40), nullable=False, index=True),
    Column("reservation_id", String(40), nullable=False, unique=True),
    Column("record_json", Text, nullable=False),
    Column("meters_json", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    # null until resolved; then "settled" (with the ledger row) or "voided"
    Column("resolution", String(16)),
    Column("resolved_at_us", BigInteger),
    Column("ledger_id", String(40)),
    Column("note", Text),
)

# The append-only ledger: one row per billable event. Never updated, never deleted.
ledger = Table(
    "ledger",
    metadata,
    Column("seq", AutoId, primary_key=True, autoincrement=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("organization_id", String(40), nullable=False),
    Column("workspace_id", String(40), nullable=False),
    Column("key_id", String(40), nullable=True),
    Column("key_prefix", String(32), nullable=True),
    Column("key_name", String(200), nullable=True),
    Column("identifier_id", String(200), nullable=True),
    Column("user_id", String(200), nullable=True),
    Column("source", String(32), nullable=False),
    Column("endpoint", String(200), nullable=True),
    Column("event", String(64), nullable=False),
    Column("units", BigInteger, nullable=False),
    Column("run_id", String(200), nullable=True),
    Column("metadata_json", Text, nullable=True),
    Column("model", String(200), nullable=True),
    Column("modality", String(32), nullable=False),
    Column("provider", String(64), nullable=True),
    Column("region", String(64), nullable=True),
    Column("billing_unit", String(32), nullable=False),
    Column("audio_ms", BigInteger, nullable=True),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cache_read_tokens", BigInteger, nullable=False),
    Column("cache_write_tokens", BigInteger, nullable=False),
    Column("total_tokens", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("list_cost_nanos", BigInteger, nullable=False),
    Column("discount_applied_pct", Integer, nullable=False),
    Column("cost_nanos", BigInteger, nullable=False),
    Column("credits_nanos", BigInteger, nullable=False),
    Column("priced", Boolean, nullable=False),
    Column("overage", Boolean, nullable=False, default=False),
    Column("failover", Boolean, nullable=False, default=False),
    Column("receipt_id", String(64), nullable=True),
    # Client-chosen event id (events API) and the hash of its body: idempotency within an organization.
    Column("idempotency_key", String(200), nullable=True),
    Column("request_hash", String(64), nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    Column("recorded_at_us", BigInteger, nullable=False),
    # How ``credits_nanos`` was drawn: from the monthly bucket, from bonus; the rest is overage.
    Column("credits_monthly_nanos", BigInteger, nullable=False),
    Column("credits_bonus_nanos", BigInteger, nullable=False),
    # The usage vector (meterline.metering.records): parts of the token columns above, and per-call counts.
    Column("cache_write_1h_tokens", BigInteger, nullable=False, server_default="0"),
    Column("input_audio_tokens", BigInteger, nullable=False, server_default="0"),
    Column("cache_audio_read_tokens", BigInteger, nullable=False, server_default="0"),
    Column("output_audio_tokens", BigInteger, nullable=False, server_default="0"),
    Column("reasoning_tokens", BigInteger, nullable=False, server_default="0"),
    Column("accepted_prediction_tokens", BigInteger, nullable=False, server_default="0"),
    Column("rejected_prediction_tokens", BigInteger, nullable=False, server_default="0"),
    Column("web_searches", BigInteger, nullable=False, server_default="0"),
    Column("web_fetches", BigInteger, nullable=False, server_default="0"),
    Column("service_tier", String(32), nullable=True),
    Column("batch", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("organization_id", "idempotency_key"),
    Index("ix_ledger_org_created", "organization_id", "created_at_us"),
    Index("ix_ledger_ws_created", "workspace_id", "created_at_us"),
)

ROLLUP_DIMENSIONS = (
    "organization_id",
    "workspace_id",
    "key_id",
    "identifier_id",
    "user_id",
    "model",
    "provider",
    "endpoint",
    "source",
    "event",
)
ROLLUP_MEASURES = (
    "requests",
    "units",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "total_tokens",
    "audio_ms",
    "cost_nanos",
    "credits_nanos",
)

# Hourly rollup of the ledger, written in the same transaction as each ledger row.
usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("hour", BigInteger, nullable=False),  # whole hours since the epoch, UTC
    *(Column(name, String(200), nullable=False) for name in ROLLUP_DIMENSIONS),
    *(Column(name, BigInteger, nullable=False) for name in ROLLUP_MEASURES),
    # Leading with (organization, hour) lets the upsert key also serve organization-wide range reads, so
    # every settle maintains two indexes here instead of three.
    UniqueConstraint("organization_id", "hour", *ROLLUP_DIMENSIONS[1:], name="uq_usage_hourly_key"),
    Index("ix_usage_hourly_ws_hour", "workspace_id", "hour"),
    # An identifier's own reads (access tokens, ?identifier_id=): its entries only, not its organization's.
    Index("ix_usage_hourly_identifier_hour", "organization_id", "identifier_id", "hour"),
)

NARROW_MEASURES = (
    "requests",
    "units",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_nanos",
    "credits_nanos",
)

# The ledger summed along one dimension at a time, per hour, day or billing period, for the whole
# organization (workspace_id '') and per workspace: what charts, histories and breakdowns group (see
# storage/usage_rollups.py). Clustered on its key (SQLite: WITHOUT ROWID) so a range read is contiguous.
usage_rollups = Table(
    "usage_rollups",
    metadata,
    Column("organization_id", String(40), nullable=False),
    Column("workspace_id", String(40), nullable=False),
    Column("dimension", String(16), nullable=False),
    Column("grain", String(1), nullable=False),  # h: hour, d: UTC day, p: billing period (start day)
    Column("bucket", BigInteger, nullable=False),  # hours or days since the epoch
    Column("value", String(200), nullable=False),
    *(Column(name, BigInteger, nullable=False) for name in NARROW_MEASURES),
    PrimaryKeyConstraint("organization_id", "workspace_id", "dimension", "grain", "bucket", "value"),
    sqlite_with_rowid=False,
)

# What the token counts were made of (the usage vector, cache reads and writes) and the requests recorded
# at cost 0 for want of a price, per hour and model: for the whole organization (workspace_id and
# identifier_id ''), each workspace (identifier_id '') and each identifier. Only ledger rows with some
# detail add to it, so plain usage costs the settle nothing here (storage/usage_details.py).
DETAIL_MEASURES = ("cache_read_tokens", "cache_write_tokens", *VECTOR_COUNTS, "unpriced_requests")
usage_details = Table(
    "usage_details",
    metadata,
    Column("organization_id", String(40), nullable=False),
    Column("workspace_id", String(40), nullable=False),
    Column("identifier_id", String(200), nullable=False),
    Column("hour", BigInteger, nullable=False),  # whole hours since the epoch, UTC
    Column("model", String(200), nullable=False),
    *(Column(name, BigInteger, nullable=False) for name in DETAIL_MEASURES),
    PrimaryKeyConstraint("organization_id", "workspace_id", "identifier_id", "hour", "model"),
    # An identifier's own reads by an organization key (any workspace): its entries only.
    Index("ix_usage_details_identifier_hour", "organization_id", "identifier_id", "hour"),
    sqlite_with_rowid=False,
)

# -- Quota counters kept in the database (storage/sql_counters.py) ---------------------------------------
# Used when several processes share a database without Redis (``serve --workers N``). A fixed window's
# used and reserved amounts; for a rolling minute (kind 'r') a marker row whose reset_s is its horizon.
quota_counters = Table(
    "quota_counters",
    metadata,
    Column("key", String(1024), nullable=False),
    Column("kind", String(1), nullable=False),
    Column("used", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("reset_s", BigInteger, nullable=False),
    PrimaryKeyConstraint("key", "kind"),
)
# A rolling minute's one-second buckets (those at or behind the horizon no longer count).
quota_seconds = Table(
    "quota_seconds",
    metadata,
    Column("key", String(1024), nullable=False),
    Column("second", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),
    PrimaryKeyConstraint("key", "second"),
)
# Open reservations on those counters, with their lines (JSON): what a settle or release moves, and what
# the reaper finds when their lease has passed.
quota_holds = Table(
    "quota_holds",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("expires_us", BigInteger, nullable=False, index=True),
    Column("second", BigInteger, nullable=False),
    Column("lines", Text, nullable=False),
)
# Events (quota refusals) per key and minute, for "rate limits exceeded frequently".
quota_tallies = Table(
    "quota_tallies",
    metadata,
    Column("key", String(1024), nullable=False),
    Column("minute", BigInteger, nullable=False),
    Column("events", BigInteger, nullable=False),
    PrimaryKeyConstraint("key", "minute"),
)

# -- Identifier tokens (seed 000) ----------------------------------------------------------------------
# A token family is the chain of refresh tokens grown from one POST /v1/token; revoking it (on refresh
# token reuse) ends every refresh and access token of the chain. Access tokens are not stored: they are
# checked against their family (and its issuing key) by primary key on every use.
token_families = Table(
    "token_families",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("organization_id", String(40), ForeignKey("organizations.id"), nullable=False),
    Column("workspace_id", String(40), ForeignKey("workspaces.id"), nullable=False),
    Column("identifier_id", String(200), nullable=False),
    Column("key_id", String(40), ForeignKey("api_keys.id"), nullable=False, index=True),
    # The lifetime asked for at issue, kept so that refreshed access tokens live as long as the first.
    Column("access_ttl_s", Integer, nullable=False),
    Column("revoked_at_us", BigInteger, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
)

# Only the SHA-256 of a refresh token is stored. ``used_at_us`` is set exactly once, by a conditional
# UPDATE, which is what makes rotation race-free.
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("family_id", String(40), ForeignKey("token_families.id"), nullable=False, index=True),
    Column("organization_id", String(40), nullable=False),
    Column("workspace_id", String(40), nullable=False),
    Column("identifier_id", String(200), nullable=False),
    Column("key_id", String(40), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("expires_at_us", BigInteger, nullable=False),
    Column("used_at_us", BigInteger, nullable=True),
)

# -- Receipts (seed 004) -------------------------------------------------------------------------------
# One signed receipt per ledger row that asked for one, chained per organization: ``seq`` 1, 2, 3… and
# ``prev_hash`` = link hash of the previous receipt's JWS. Written in the settle transaction, under the
# organization's lock, with the chain head; never updated, never deleted.
receipts = Table(
    "receipts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("organization_id", String(40), nullable=False),
    Column("workspace_id", String(40), nullable=False),
    Column("ledger_id", String(36), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("jws", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    # Also the index of chain reads: (organization, seq) ranges in order.
    UniqueConstraint("organization_id", "seq"),
)

# The head of each organization's chain: read and advanced in the settle transaction, so the next
# receipt's ``seq`` and ``prev`` are one primary-key read away however long the chain is.
receipt_chains = Table(
    "receipt_chains",
    metadata,
    Column("organization_id", String(40), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("head_hash", String(64), nullable=False),
)

# -- Alerts and webhooks (issue 5, seeds 001/002) ------------------------------------------------------
# One row per alert that fired. The unique key is what makes each alert fire exactly once per period
# (billing period for thresholds, UTC day / hour for the other kinds), even with several writers.
alerts = Table(
    "alerts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("organization_id", String(40), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("threshold", Integer, nullable=False),
    Column("period_start_us", BigInteger, nullable=False),
    Column("message", Text, nullable=False),
    Column("details_json", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    UniqueConstraint("organization_id", "kind", "threshold", "period_start_us"),
    Index("ix_alerts_organization_id_created_at_us", "organization_id", "created_at_us"),
)

# The signing secret is stored sealed (``enc:v1:<kid>:…``, AES-256-GCM under a data key from the key
# file, bound to the row's id; see storage/webhook_store.py), never as the ``whsec_`` text, and shown only
# on creation. Rows from before sealing hold the ``whsec_`` text until `meterline serve` seals them.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("organization_id", String(40), ForeignKey("organizations.id"), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("description", String(200), nullable=True),
    Column("secret", String(100), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("disabled", Boolean, nullable=False, server_default="0"),
)

# One row per (alert, endpoint) to deliver. ``next_attempt_at_us`` doubles as the claim token: a sender
# moves it forward with a conditional UPDATE before sending. Delivered rows keep ``delivered_at_us``.
webhook_outbox = Table(
    "webhook_outbox",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("endpoint_id", String(40), ForeignKey("webhook_endpoints.id"), nullable=False),
    Column("alert_id", String(40), nullable=False),
    Column("event_type", String(60), nullable=False),
    Column("payload_json", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at_us", BigInteger, nullable=True),
    Column("delivered_at_us", BigInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    Index("ix_webhook_outbox_due", "delivered_at_us", "next_attempt_at_us"),
)
