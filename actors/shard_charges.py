"""The shard's auto-recharge charges: each runs once per process, after the commit that asked for
it, and settles through the commit loop like any command (a mixin of ShardActor)."""

from __future__ import annotations

import asyncio
import logging

from actors import commands as cmd
from actors.batch import CommandItem
from actors.clock import now_us
from actors.org import ChargeRequest

log = logging.getLogger("metergate.shard")

RECHARGE_RETRY_AFTER_S = 120  # a pending charge with no charger running is tried again after this


class ShardCharges:
    def _start_charges(self, charges: list[ChargeRequest]) -> None:
        """Run each requested charge once per process (its Stripe key makes reruns harmless)."""
        for charge in charges:
            key = (charge.org_id, charge.charge_id)
            if key not in self.charging:
                self.charging[key] = asyncio.ensure_future(self._run_charge(charge))

    async def _run_charge(self, charge: ChargeRequest) -> None:
        try:
            settle = await self.charger.charge(charge)
            if settle is not None:
                future = asyncio.get_running_loop().create_future()
                self.pending.append(CommandItem(charge.org_id, settle, future, cmd.fingerprint(settle)))
                self.wake.set()
                await future
        except Exception:  # noqa: BLE001 - the charge stays pending and is tried again later
            log.exception("shard %s: auto-recharge %s/%s", self.shard, charge.org_id, charge.charge_id)
        finally:
            self.charging.pop((charge.org_id, charge.charge_id), None)

    def _retry_stuck_charges(self) -> None:
        cutoff = now_us() - RECHARGE_RETRY_AFTER_S * 1_000_000
        stuck = []
        for lo in self.orgs.values():
            r = lo.org.recharge
            if r is not None and r.pending_id is not None and r.pending_since_us < cutoff:
                stuck.append(lo.org.pending_charge())
        self._start_charges(stuck)
