"""metergate_client: gate decisions for a compute plane, in its own process.

    from metergate_client import GateClient, Resources
    gate = GateClient("http://billing:8000", token)
    if gate.check("org_1", "create", Resources(memory_mb=4096)).allowed: ...

Needs only msgspec, httpx and cryptography (capability tokens); never Ray. See docs/integrate/gateways.md.
"""

from metergate_client.captoken import Capability, CapabilityError, Refusal, Verifier
from metergate_client.client import Answer, GateClient, Policy
from metergate_client.decision import (
           ACTIONS,
           BadResources,
           Decision,
           GateView,
           HaltCause,
           Reason,
           Resources,
           decide,
)
from metergate_client.projection import Projection, ViewRecord

__all__ = ["ACTIONS", "Answer", "BadResources", "Capability", "CapabilityError", "Decision", "GateClient", "GateView", "HaltCause", "Policy", "Projection",
           "Reason", "Refusal", "Resources", "Verifier", "ViewRecord", "decide"]
