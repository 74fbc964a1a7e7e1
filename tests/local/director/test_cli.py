"""`pgbosh director serve` as a process: arguments, director.json, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]


def serve(state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "controller", "director", "serve", "--listen", "127.0.0.1:0",
                             "--state-dir", str(state), "--resurrection-delay", "5", "--agent-timeout", "4"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_info(state: Path, proc: subprocess.Popen[bytes], old: str = "") -> dict[str, str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            info: dict[str, str] = json.loads((state / "director.json").read_text())
            if info["url"] != old:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("no director.json")


def test_help_documents_the_options_and_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "controller", "director", "serve", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    for option in ("--listen", "--state-dir", "--resurrection-delay", "--agent-timeout", "--vm-root", "--run-as",
                   "--max-threads"):
        assert option in out
    assert "default 2" in out and "default 3" in out and "default postgres" in out and "default 32" in out


def test_max_threads_must_be_a_positive_whole_number(tmp_path: Path) -> None:
    for value, message in (("0", "must be 1 or more, not 0"), ("two", "'two' is not a whole number")):
        run = subprocess.run([sys.executable, "-m", "controller", "director", "serve", "--state-dir",
                              str(tmp_path), "--max-threads", value], cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 2 and f"--max-threads: {message}" in run.stderr, run.stderr


def test_serve_writes_director_json_and_stops_on_sigterm(short_tmp: Path) -> None:
    state = short_tmp / "state"
    proc = serve(state)
    try:
        info = wait_info(state, proc)
        assert (state / "director.json").stat().st_mode & 0o777 == 0o600
        assert set(info) >= {"url", "uaa_url", "client_id", "client_secret"}
        resp = httpx.get(f"{info['url']}/info")
        assert resp.status_code == 200 and resp.json()["user_authentication"]["options"]["url"] == info["url"]
        token = httpx.post(f"{info['url']}/oauth/token", data={"grant_type": "client_credentials"},
                           auth=(info["client_id"], info["client_secret"])).json()["access_token"]
        assert httpx.get(f"{info['url']}/deployments", headers={"Authorization": f"bearer {token}"}).json() == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert info["client_secret"] not in stderr
        stdout = proc.stdout.read().decode() if proc.stdout else ""
        assert info["url"] in stdout and info["client_secret"] not in stdout
        # the secret is generated once and kept; the old token still works after a restart
        again = serve(state)
        try:
            info2 = wait_info(state, again, old=info["url"])
            assert info2["client_secret"] == info["client_secret"]
            resp = httpx.get(f"{info2['url']}/deployments", headers={"Authorization": f"bearer {token}"})
            assert resp.status_code == 200
        finally:
            again.send_signal(signal.SIGTERM)
            again.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
