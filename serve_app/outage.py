"""What a caller is told while metergate cannot answer: 503, `Retry-After`, and a code saying
whether the request may have been applied. Standard library only: the HAProxy front
(haproxy_front.py) runs this at every HAProxy start, before the real binary."""

from __future__ import annotations

RETRY_AFTER_S = 1  # what a 503 asks a caller to wait before retrying

NOT_REACHED = ("service_unavailable", "metergate is not reachable right now (restarting); retry the request")
MAY_HAVE_RUN = ("outcome_unknown", "the request reached metergate, which did not answer it (restarting); retry it "
                "with the same Idempotency-Key, tick ids or lease id, which make the retry safe")
