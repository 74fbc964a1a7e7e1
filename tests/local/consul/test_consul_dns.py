"""The local Consul's DNS interface, queried with the real `dig`.

Expected behaviour from Consul's docs "Perform static DNS queries" / "DNS interface":
`[tag.]<service>.service[.<dc>].consul` A and SRV, RFC 2782 `_<service>._<tag>.service.consul`,
instances with a critical check left out, TTL 0 (dns_config.service_ttl default), and an
NXDOMAIN for unknown names with the zone SOA in authority, as a real agent answers:
`consul. 0 IN SOA ns.consul. postmaster.consul. <serial> 3600 600 86400 0`.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import consul
import pytest

from controller.local.consul import ConsulServer, serve_in_thread

DIG = shutil.which("dig") or "/usr/bin/dig"


def dig(server: ConsulServer, *args: str) -> str:
    out = subprocess.run(
        [DIG, "@127.0.0.1", "-p", str(server.dns_port), "+time=2", "+tries=1", *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return out.stdout


def short(server: ConsulServer, name: str, qtype: str = "A", *extra: str) -> list[str]:
    return sorted(line for line in dig(server, name, qtype, "+short", *extra).splitlines() if line)


@pytest.fixture
def server() -> Iterator[ConsulServer]:
    with serve_in_thread(http_port=0, dns_port=0) as srv:
        c = consul.Consul(port=srv.http_port)
        # one external node with a master and two replicas, like the publisher writes
        for sid, tag, addr, port in (
            ("m", "master", "127.0.0.61", 5432),
            ("r1", "replica", "127.0.0.62", 5433),
            ("r2", "replica", "127.0.0.63", 5434),
        ):
            c.catalog.register(
                "pg-dns",
                "127.0.0.60",
                skip_node_update=True,
                service={"ID": f"pg-dns-{sid}", "Service": "pg-dns", "Tags": [tag], "Address": addr, "Port": port},
                check={"CheckID": f"service:pg-dns-{sid}", "Status": "passing", "ServiceID": f"pg-dns-{sid}"},
            )
        # an instance without its own address falls back to its node's
        c.catalog.register("plain-node", "127.0.0.70", service={"ID": "plain", "Service": "plain", "Port": 80})
        yield srv


def test_a_records_by_tag_and_service(server: ConsulServer) -> None:
    assert short(server, "master.pg-dns.service.consul") == ["127.0.0.61"]
    assert short(server, "replica.pg-dns.service.consul") == ["127.0.0.62", "127.0.0.63"]
    assert short(server, "pg-dns.service.consul") == ["127.0.0.61", "127.0.0.62", "127.0.0.63"]
    assert short(server, "master.pg-dns.service.dc1.consul") == ["127.0.0.61"]
    assert short(server, "MASTER.PG-DNS.service.consul.") == ["127.0.0.61"]  # DNS is case-insensitive
    assert short(server, "plain.service.consul") == ["127.0.0.70"]


def test_answer_ttl_zero_and_authoritative(server: ConsulServer) -> None:
    out = dig(server, "master.pg-dns.service.consul", "A", "+noall", "+answer", "+comments")
    answer = [line.split() for line in out.splitlines() if line and not line.startswith(";")]
    assert answer == [["master.pg-dns.service.consul.", "0", "IN", "A", "127.0.0.61"]]
    assert "flags: qr aa" in out


def test_srv_records_and_rfc2782(server: ConsulServer) -> None:
    srv = short(server, "master.pg-dns.service.consul", "SRV")
    assert srv == ["1 1 5432 7f00003d.addr.dc1.consul."]
    full = dig(server, "replica.pg-dns.service.consul", "SRV")
    assert "7f00003e.addr.dc1.consul. 0\tIN\tA\t127.0.0.62" in full  # target address in ADDITIONAL
    assert short(server, "_pg-dns._master.service.consul", "SRV") == ["1 1 5432 7f00003d.addr.dc1.consul."]
    assert len(short(server, "_pg-dns._tcp.service.consul", "SRV")) == 3  # "tcp" = no tag filter


def test_tcp_transport(server: ConsulServer) -> None:
    assert short(server, "master.pg-dns.service.consul", "A", "+tcp") == ["127.0.0.61"]


def test_nxdomain_with_soa_and_empty_aaaa(server: ConsulServer) -> None:
    out = dig(server, "nope.service.consul")
    assert "status: NXDOMAIN" in out
    soa = [line.split() for line in out.splitlines() if "\tSOA\t" in line]
    assert soa and soa[0][:2] == ["consul.", "0"]
    assert soa[0][4:6] == ["ns.consul.", "postmaster.consul."]
    assert soa[0][7:] == ["3600", "600", "86400", "0"]
    assert "status: NXDOMAIN" in dig(server, "standby.pg-dns.service.consul")  # unknown tag
    aaaa = dig(server, "master.pg-dns.service.consul", "AAAA")
    assert "status: NOERROR" in aaaa and "ANSWER: 0" in aaaa


def test_critical_instances_leave_dns(server: ConsulServer) -> None:
    c = consul.Consul(port=server.http_port)
    assert c.agent.service.register(
        "ttl-svc", service_id="t1", address="127.0.0.81", port=1, check=consul.Check.ttl("1s")
    )
    assert "status: NXDOMAIN" in dig(server, "ttl-svc.service.consul")  # TTL checks start critical
    c.agent.check.ttl_pass("service:t1")
    assert short(server, "ttl-svc.service.consul") == ["127.0.0.81"]
    deadline = time.monotonic() + 4
    while short(server, "ttl-svc.service.consul") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert short(server, "ttl-svc.service.consul") == []
    assert c.health.service("ttl-svc", passing=True)[1] == []


def test_node_lookup(server: ConsulServer) -> None:
    assert short(server, "plain-node.node.consul") == ["127.0.0.70"]
    assert "status: NXDOMAIN" in dig(server, "ghost.node.consul")


def test_garbage_gets_formerr_and_server_keeps_answering(server: ConsulServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fbad", ("127.0.0.1", server.dns_port))
        reply, _ = s.recvfrom(512)
    qid, flags = struct.unpack("!HH", reply[:4])
    assert qid == 0x1234 and flags & 0x8000 and flags & 0xF == 1  # QR, FORMERR
    assert short(server, "master.pg-dns.service.consul") == ["127.0.0.61"]


def test_large_answers_truncate_over_udp_and_complete_over_tcp(server: ConsulServer) -> None:
    c = consul.Consul(port=server.http_port)
    for n in range(1, 61):
        c.catalog.register(f"big-{n}", f"127.0.9.{n}", service={"ID": "big", "Service": "big", "Port": 1})
    udp = dig(server, "big.service.consul", "A", "+noedns", "+ignore")
    assert "flags: qr aa tc" in udp
    assert len(short(server, "big.service.consul", "A", "+tcp")) == 60
