"""Consul's DNS interface for service lookups, in DNS wire format (RFC 1035).

Names answered (Consul docs, "Perform static DNS queries"):
  [tag.]<service>.service[.<dc>].consul     A, SRV (ANY answers like A)
  _<service>._<tag>.service[.<dc>].consul    RFC 2782 form; tag "tcp" means no tag filter
  <node>.node[.<dc>].consul                  A
TTL 0 (Consul's default service_ttl/node_ttl), authoritative answers, NXDOMAIN with
the zone's SOA in authority for unknown names (like Consul's
`consul. 0 IN SOA ns.consul. postmaster.consul. <serial> 3600 600 86400 0`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
import time
from dataclasses import dataclass
from typing import cast

from controller.local.consul.state import CRITICAL, PASSING, Store

log = logging.getLogger(__name__)

TYPE_A, TYPE_NS, TYPE_SOA, TYPE_AAAA, TYPE_SRV, TYPE_OPT, TYPE_ANY = 1, 2, 6, 28, 33, 41, 255
CLASS_IN = 1
RCODE_OK, RCODE_FORMERR, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 0, 1, 3, 4, 5
UDP_DEFAULT_SIZE = 512
UDP_MAX_SIZE = 4096


class DNSFormatError(Exception):
    pass


@dataclass(frozen=True)
class Question:
    name: str  # as sent, without the trailing dot
    qtype: int
    qclass: int


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    question: Question | None
    udp_size: int
    edns: bool


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    jumped_end: int | None = None
    hops = 0
    while True:
        if offset >= len(data):
            raise DNSFormatError("name runs past the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data) or hops > 16:
                raise DNSFormatError("bad compression pointer")
            if jumped_end is None:
                jumped_end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            hops += 1
            continue
        offset += 1
        if length == 0:
            break
        labels.append(data[offset : offset + length].decode("ascii", errors="replace"))
        offset += length
    return ".".join(labels), (jumped_end if jumped_end is not None else offset)


def parse_query(data: bytes) -> Query:
    if len(data) < 12:
        raise DNSFormatError("short header")
    qid, flags, qdcount, _an, _ns, arcount = struct.unpack("!HHHHHH", data[:12])
    offset = 12
    question = None
    if qdcount >= 1:
        name, offset = _read_name(data, offset)
        if offset + 4 > len(data):
            raise DNSFormatError("short question")
        qtype, qclass = struct.unpack("!HH", data[offset : offset + 4])
        offset += 4
        question = Question(name, qtype, qclass)
    udp_size, edns = UDP_DEFAULT_SIZE, False
    for _ in range(arcount if qdcount == 1 else 0):
        try:
            _name, offset = _read_name(data, offset)
            rtype, rclass, _ttl, rdlen = struct.unpack("!HHIH", data[offset : offset + 10])
        except (DNSFormatError, struct.error):
            break
        offset += 10 + rdlen
        if rtype == TYPE_OPT:
            edns, udp_size = True, max(UDP_DEFAULT_SIZE, min(rclass, UDP_MAX_SIZE))
    return Query(qid, flags, question, udp_size, edns)


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            raw = label.encode("ascii")
            out += bytes([len(raw)]) + raw
    return out + b"\x00"


def _rr(owner: bytes, rtype: int, rdata: bytes, ttl: int = 0) -> bytes:
    return owner + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(rdata)) + rdata


QUESTION_POINTER = b"\xc0\x0c"  # the question's name always starts at offset 12


class Resolver:
    """Turns a question into answer, authority and additional records from the Store."""

    def __init__(self, store: Store, domain: str = "consul", only_passing: bool = False) -> None:
        self.store = store
        self.domain = domain.strip(".").lower()
        self.only_passing = only_passing

    def soa(self) -> bytes:
        rdata = (
            encode_name(f"ns.{self.domain}")
            + encode_name(f"postmaster.{self.domain}")
            + struct.pack("!IIIII", int(time.time()) & 0xFFFFFFFF, 3600, 600, 86400, 0)
        )
        return _rr(encode_name(self.domain), TYPE_SOA, rdata)

    def _healthy(self, name: str, tag: str | None) -> list[tuple[str, str, int, int]] | None:
        """(node, address, port, weight) of usable instances, or None if the name is unknown."""
        if not self.store.service_exists(name):
            return None
        found = []
        for svc in self.store.instances(name, [tag] if tag else []):
            statuses = {c.status for c in self.store.service_checks(svc)}
            if CRITICAL in statuses or (self.only_passing and statuses - {PASSING}):
                continue
            node = self.store.nodes.get(svc.node)
            address = svc.address or (node.address if node else "")
            warning = bool(statuses - {PASSING})
            weight = svc.weights.get("Warning" if warning else "Passing", 1)
            found.append((svc.node, address, svc.port, weight))
        return found

    def resolve(self, question: Question) -> tuple[int, list[bytes], list[bytes], list[bytes]]:
        labels = [label.lower() for label in question.name.strip(".").split(".") if label]
        domain_labels = self.domain.split(".")
        if labels[-len(domain_labels) :] != domain_labels:
            return RCODE_REFUSED, [], [], []
        labels = labels[: -len(domain_labels)]
        if len(labels) >= 2 and labels[-2] in ("service", "node"):
            if labels[-1] != self.store.datacenter:
                return RCODE_NXDOMAIN, [], [self.soa()], []
            labels = labels[:-1]
        if not labels:
            if question.qtype in (TYPE_SOA, TYPE_ANY):
                return RCODE_OK, [self.soa()], [], []
            return RCODE_OK, [], [self.soa()], []
        kind, rest = labels[-1], labels[:-1]
        if kind == "node" and len(rest) == 1:
            node = next((n for n in self.store.nodes.values() if n.name.lower() == rest[0]), None)
            if node is None:
                return RCODE_NXDOMAIN, [], [self.soa()], []
            return self._address_answers(question, [node.address])
        if kind != "service" or not rest or len(rest) > 2:
            return RCODE_NXDOMAIN, [], [self.soa()], []
        if len(rest) == 2 and rest[0].startswith("_") and rest[1].startswith("_"):
            service, tag = rest[0][1:], rest[1][1:]
            tag = "" if tag == "tcp" else tag
        elif len(rest) == 2:
            tag, service = rest
        else:
            service, tag = rest[0], ""
        name = next((s.name for s in self.store.services.values() if s.name.lower() == service), None)
        instances = self._healthy(name, tag or None) if name else None
        if not instances:
            return RCODE_NXDOMAIN, [], [self.soa()], []
        random.shuffle(instances)
        if question.qtype == TYPE_SRV:
            answers, extra = [], []
            for _node, address, port, weight in instances:
                target = self._target(address)
                answers.append(_rr(QUESTION_POINTER, TYPE_SRV, struct.pack("!HHH", 1, weight, port) + target))
                extra.extend(self._address_records(target, address))
            return RCODE_OK, answers, [], extra
        return self._address_answers(question, [a for _n, a, _p, _w in instances])

    def _target(self, address: str) -> bytes:
        try:
            packed = ipaddress.ip_address(address).packed
        except ValueError:
            return encode_name(address)
        return encode_name(f"{packed.hex()}.addr.{self.store.datacenter}.{self.domain}")

    @staticmethod
    def _address_records(owner: bytes, address: str) -> list[bytes]:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return []
        return [_rr(owner, TYPE_A if ip.version == 4 else TYPE_AAAA, ip.packed)]

    def _address_answers(
        self, question: Question, addresses: list[str]
    ) -> tuple[int, list[bytes], list[bytes], list[bytes]]:
        wanted = {TYPE_A: 4, TYPE_ANY: 4, TYPE_AAAA: 6}.get(question.qtype)
        answers: list[bytes] = []
        seen: set[str] = set()
        for address in addresses:
            if address in seen:
                continue
            seen.add(address)
            for record in self._address_records(QUESTION_POINTER, address):
                rtype = struct.unpack("!H", record[2:4])[0]
                if (wanted == 4 and rtype == TYPE_A) or (wanted == 6 and rtype == TYPE_AAAA):
                    answers.append(record)
        if not answers:
            return RCODE_OK, [], [self.soa()], []
        return RCODE_OK, answers, [], []

    def answer(self, data: bytes, max_size: int | None) -> bytes | None:
        """The wire reply to one query; max_size None means TCP (64 KiB)."""
        try:
            query = parse_query(data)
        except DNSFormatError:
            if len(data) < 2:
                return None
            return struct.pack("!HHHHHH", struct.unpack("!H", data[:2])[0], 0x8000 | RCODE_FORMERR, 0, 0, 0, 0)
        opcode = (query.flags >> 11) & 0xF
        rd = query.flags & 0x0100
        flags = 0x8000 | 0x0400 | rd | (opcode << 11)
        q = query.question
        if q is None:
            return struct.pack("!HHHHHH", query.id, flags | RCODE_FORMERR, 0, 0, 0, 0)
        question_wire = encode_name(q.name) + struct.pack("!HH", q.qtype, q.qclass)
        answers: list[bytes]
        authority: list[bytes]
        extra: list[bytes]
        if opcode != 0:
            rcode, answers, authority, extra = RCODE_NOTIMP, [], [], []
        elif q.qclass not in (CLASS_IN, TYPE_ANY):
            rcode, answers, authority, extra = RCODE_REFUSED, [], [], []
        else:
            rcode, answers, authority, extra = self.resolve(q)
        if rcode == RCODE_REFUSED:
            flags &= ~0x0400
        opt = [encode_name("") + struct.pack("!HHIH", TYPE_OPT, UDP_MAX_SIZE, 0, 0)] if query.edns else []
        limit = 65535 if max_size is None else min(max_size, query.udp_size)
        truncated = False
        while True:
            body = b"".join(answers) + b"".join(authority) + b"".join(extra) + b"".join(opt)
            header = struct.pack(
                "!HHHHHH",
                query.id,
                flags | rcode | (0x0200 if truncated else 0),
                1,
                len(answers),
                len(authority),
                len(extra) + len(opt),
            )
            message = header + question_wire + body
            if len(message) <= limit:
                return message
            truncated = True
            if extra:
                extra = []
            elif answers:
                answers = answers[:-1]
            else:
                return message[:limit]


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        try:
            reply = self.resolver.answer(data, UDP_DEFAULT_SIZE)
        except Exception:  # a bad packet must never stop the server
            log.exception("dns: failed to answer a query")
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DNSServer:
    """UDP and TCP listeners on the same host:port."""

    def __init__(self, resolver: Resolver, host: str = "127.0.0.1", port: int = 8600) -> None:
        self.resolver = resolver
        self.host = host
        self.port = port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        last_error: OSError | None = None
        for _attempt in range(20 if self.port == 0 else 1):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(self.resolver), local_addr=(self.host, self.port)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError as exc:  # the ephemeral UDP port is taken for TCP: try another
                transport.close()
                last_error = exc
                continue
            self._udp, self.port = transport, port
            return
        raise OSError(f"dns: cannot listen on {self.host}:{self.port}: {last_error}")

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                reply = self.resolver.answer(await reader.readexactly(size), None)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None
