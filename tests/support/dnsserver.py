"""A tiny authoritative DNS server on loopback UDP for the doctor's tests (dnspython)."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from tests.support.upstream import LoopThread


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = zone
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        q = query.question[0]
        name = q.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        known = {n for n, _ in self.zone}
        if name not in known:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        else:
            values = self.zone.get((name, rdtype), [])
            if not values and rdtype in ("A", "AAAA") and (name, "CNAME") in self.zone:
                values, rdtype = self.zone[(name, "CNAME")], "CNAME"
            if values:
                resp.answer.append(dns.rrset.from_text(name + ".", 60, "IN", rdtype, *values))
        self.transport.sendto(resp.to_wire(), addr)


class DnsServer:
    """zone: {(name, rdtype): [values]}; names not in the zone are NXDOMAIN."""

    def __init__(self, lt: LoopThread, zone: dict[tuple[str, str], list[str]]) -> None:
        self.lt, self.zone, self.port = lt, zone, 0

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _Proto(self.zone), local_addr=("127.0.0.1", 0)
        )
        self.port = self.transport.get_extra_info("sockname")[1]

    def __enter__(self) -> DnsServer:
        self.lt.run(self._start())
        return self

    def __exit__(self, *_: object) -> None:
        self.lt.loop.call_soon_threadsafe(self.transport.close)
