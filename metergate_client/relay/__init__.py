"""The relay: gate decisions from the feed for a gateway in any language, over loopback HTTP.

`metergate relay` (or `python -m metergate_client.relay`) runs beside a gateway: a GateClient
follows the server's feed, and POST /v1/gate and /v1/gate/batch on 127.0.0.1 (or a Unix
socket) are answered from its projection with the server's JSON plus `source` and `age_s`;
everything else is forwarded to the server. See docs/integrate/relay.md.

Needs msgspec, httpx and uvicorn; never Ray, never the server's packages.
"""

from metergate_client.relay.app import Relay
from metergate_client.relay.run import running, serve

__all__ = ["Relay", "running", "serve"]
