"""Why a shard refuses a command or a read: one code per cause, and the core's exceptions.

A refusal is an answer, not a failure of the shard: the core raises a BillingError, the
shard answers it (and its own refusals: wrong shard, overload, an outage) as
`{"error": {"code", "message"}}`. What a code means in HTTP is decided once, at the edge
(serve_app/errors.py), never here.
"""

from __future__ import annotations

from enum import StrEnum


class Refusal(StrEnum):
    INVALID_COMMAND = "invalid_command"
    UNKNOWN_LEASE = "unknown_lease"
    LEASE_ENDED = "lease_ended"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    UNKNOWN_ORG = "unknown_org"
    UNKNOWN_PLAN = "unknown_plan"
    UNKNOWN_UNIT = "unknown_unit"
    WRONG_SHARD = "wrong_shard"
    SHARD_BUSY = "shard_busy"
    SHARD_UNAVAILABLE = "shard_unavailable"
    SHARD_VERSION_MISMATCH = "shard_version_mismatch"  # config/version.py: a deploy mixes versions
    OUTCOME_UNKNOWN = "outcome_unknown"
    UNSTORABLE_INPUT = "unstorable_input"
    INTERNAL_ERROR = "internal_error"
    ORG_UNREADABLE = "org_unreadable"  # the org's stored rows do not decode or replay (actors/formats.py)
    CUTOVER_CHARGED = "cutover_charged"  # an undo of a cutover after a charge was asked (billing-rules 2.12)


class BillingError(Exception):
    """A command the org cannot apply; `code` says why."""

    code: Refusal = Refusal.INVALID_COMMAND


class UnknownLease(BillingError):
    code = Refusal.UNKNOWN_LEASE


class LeaseEnded(BillingError):
    code = Refusal.LEASE_ENDED


class LeaseConflict(BillingError):
    code = Refusal.IDEMPOTENCY_CONFLICT


class UnknownPlan(BillingError):
    code = Refusal.UNKNOWN_PLAN
