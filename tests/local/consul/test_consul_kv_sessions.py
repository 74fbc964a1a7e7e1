"""KV (cas, recurse, keys, blocking reads) and sessions (TTL, locks) of the local Consul.

Shapes: py-consul 1.8 `consul/api/kv.py` (KV.get decodes "Value" from base64 and returns
(index, entry|None); KV.put/delete parse a JSON `true|false` body) and
`consul/api/session.py` (create returns {"ID"}; renew raises NotFound on 404; info
returns the first element of a list); Consul api-docs/kv and api-docs/session.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import consul
import httpx
import pytest

from controller.local.consul import ConsulServer, serve_in_thread


@pytest.fixture
def server() -> Iterator[ConsulServer]:
    with serve_in_thread(http_port=0, dns_port=0, session_ttl_min=0.5) as srv:
        yield srv


@pytest.fixture
def c(server: ConsulServer) -> consul.Consul:
    return consul.Consul(port=server.http_port, connections_timeout=10)


def test_kv_get_put_delete_and_entry_shape(c: consul.Consul, server: ConsulServer) -> None:
    index, missing = c.kv.get("nothing")
    assert missing is None and int(index) >= 1  # 404 still carries X-Consul-Index
    assert c.kv.put("cfg/a", "1", flags=7) is True
    _, entry = c.kv.get("cfg/a")
    # api-docs/kv#read-key sample: LockIndex, Key, Flags, Value (base64), CreateIndex, ModifyIndex
    assert {"LockIndex", "Key", "Flags", "Value", "CreateIndex", "ModifyIndex"} <= set(entry)
    assert (entry["Key"], entry["Flags"], entry["Value"]) == ("cfg/a", 7, b"1")
    raw = httpx.get(f"{server.http_addr}/v1/kv/cfg/a").json()[0]
    assert raw["Value"] == "MQ=="  # base64 on the wire
    c.kv.put("cfg/b/c", "2")
    c.kv.put("other", "3")
    _, entries = c.kv.get("cfg/", recurse=True)
    assert [e["Key"] for e in entries] == ["cfg/a", "cfg/b/c"]
    _, keys = c.kv.get("cfg/", keys=True, separator="/")
    assert keys == ["cfg/a", "cfg/b/"]
    assert c.kv.delete("cfg/", recurse=True) is True
    assert c.kv.get("cfg/", recurse=True)[1] is None
    assert c.kv.get("other")[1]["Value"] == b"3"


def test_kv_cas(c: consul.Consul) -> None:
    assert c.kv.put("leader", "a", cas=0) is True
    assert c.kv.put("leader", "b", cas=0) is False  # cas=0: only if absent
    _, entry = c.kv.get("leader")
    assert c.kv.put("leader", "c", cas=entry["ModifyIndex"] + 100) is False
    assert c.kv.put("leader", "c", cas=entry["ModifyIndex"]) is True
    assert c.kv.put("leader", "d", cas=entry["ModifyIndex"]) is False  # stale index now
    _, entry = c.kv.get("leader")
    assert entry["Value"] == b"c"
    assert c.kv.delete("leader", cas=entry["ModifyIndex"] - 1) is False
    assert c.kv.delete("leader", cas=entry["ModifyIndex"]) is True
    assert c.kv.get("leader")[1] is None


def test_kv_blocking_read_wakes_on_write(c: consul.Consul, server: ConsulServer) -> None:
    c.kv.put("watch/me", "1")
    index, _ = c.kv.get("watch/me")
    writer = consul.Consul(port=server.http_port)
    timer = threading.Timer(0.3, lambda: writer.kv.put("watch/me", "2"))
    timer.start()
    started = time.monotonic()
    new_index, entry = c.kv.get("watch/me", index=index, wait="10s")
    timer.join()
    assert time.monotonic() - started < 5
    assert int(new_index) > int(index)
    assert entry["Value"] == b"2"
    # no change: returns after `wait` with the same index
    started = time.monotonic()
    same, _ = c.kv.get("watch/me", index=new_index, wait="200ms")
    assert same == new_index and time.monotonic() - started >= 0.15


def test_session_lock_acquire_release_and_lock_delay(c: consul.Consul) -> None:
    s1 = c.session.create(name="one", ttl=30, lock_delay=1)
    s2 = c.session.create(name="two", ttl=30, lock_delay=1)
    _, info = c.session.info(s1)
    # api-docs/session#read-session sample: ID, Name, Node, LockDelay (ns), Behavior, TTL, NodeChecks
    assert (info["ID"], info["Name"], info["Behavior"], info["TTL"]) == (s1, "one", "release", "30s")
    assert info["LockDelay"] == 1_000_000_000
    assert info["Node"] == "pgbosh-local"
    assert c.kv.put("lock", "me", acquire=s1) is True
    assert c.kv.put("lock", "you", acquire=s2) is False
    _, entry = c.kv.get("lock")
    assert (entry["Session"], entry["LockIndex"], entry["Value"]) == (s1, 1, b"me")
    assert c.kv.put("lock", "not-mine", release=s2) is False
    assert c.kv.put("lock", "free", release=s1) is True
    _, entry = c.kv.get("lock")
    assert "Session" not in entry
    assert c.kv.put("lock", "you", acquire=s2) is True
    # destroying the holder releases the lock (Behavior release) and starts the lock-delay
    assert c.session.destroy(s2) is True
    _, entry = c.kv.get("lock")
    assert "Session" not in entry and entry["Value"] == b"you"
    assert c.kv.put("lock", "me", acquire=s1) is False  # within lock-delay
    time.sleep(1.1)
    assert c.kv.put("lock", "me", acquire=s1) is True
    with pytest.raises(consul.ConsulException):
        c.kv.put("lock", "x", acquire="00000000-0000-0000-0000-00000000dead")  # 500 invalid session


def test_session_ttl_expiry_renew_and_delete_behavior(c: consul.Consul, server: ConsulServer) -> None:
    # py-consul's Session.create asserts 10 <= ttl, so a short test TTL goes over raw HTTP
    # to a server built with session_ttl_min=0.5
    r = httpx.put(f"{server.http_addr}/v1/session/create", json={"TTL": "1s", "Behavior": "delete", "LockDelay": "0s"})
    sess = r.json()["ID"]
    assert c.kv.put("eph", "x", acquire=sess)
    renewed = c.session.renew(sess)
    assert renewed["ID"] == sess
    # Consul invalidates after up to 2 x TTL; poll until gone
    deadline = time.monotonic() + 4
    while c.session.info(sess)[1] is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.session.info(sess)[1] is None
    assert c.kv.get("eph")[1] is None  # Behavior delete removed the held key
    with pytest.raises(consul.NotFound):
        c.session.renew(sess)


def test_session_ttl_bounds_like_consul() -> None:
    with serve_in_thread(http_port=0, dns_port=0) as server:  # default minimum 10s like Consul
        r = httpx.put(f"{server.http_addr}/v1/session/create", json={"TTL": "5s"})
        assert r.status_code == 400
        assert r.text.startswith("Invalid Session TTL")
        r = httpx.put(f"{server.http_addr}/v1/session/create", json={"TTL": "15s"})
        assert r.status_code == 200 and set(r.json()) == {"ID"}
