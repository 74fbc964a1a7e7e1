"""BoshConfig: local-director defaults, PGBOSH_BOSH_* overrides, the secret kept out of sight."""

from __future__ import annotations

from pathlib import Path

from controller.bosh.config import BoshConfig, RetryPolicy, Secret


def test_defaults_match_the_local_world() -> None:
    c = BoshConfig()
    assert c.director_url == "http://127.0.0.1:25555"
    assert c.ca_cert is None and c.client_secret is None
    assert (c.release_name, c.release_version, c.network, c.job_name) == (
        "pgbosh",
        "0.1.0",
        "default",
        "postgres",
    )
    assert c.consul_http_addr == "http://127.0.0.1:8500"


def test_from_env_reads_fields_and_the_secret_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("from-a-kubernetes-secret\n")
    c = BoshConfig.from_env(
        {
            "PGBOSH_BOSH_DIRECTOR_URL": "https://10.0.0.6:25555",
            "PGBOSH_BOSH_CA_CERT": "/etc/pgbosh/director-ca.pem",
            "PGBOSH_BOSH_CLIENT_ID": "pgbosh",
            "PGBOSH_BOSH_CLIENT_SECRET_FILE": str(secret_file),
            "PGBOSH_BOSH_TLS": "true",
            "PGBOSH_BOSH_POSTGRES_PORT": "6432",
            "PGBOSH_BOSH_INITIAL_DATABASES": "app, reports",
            "PGBOSH_BOSH_TOKEN_REFRESH_MARGIN": "30",
            "UNRELATED": "x",
        }
    )
    assert c.director_url == "https://10.0.0.6:25555"
    assert c.ca_cert == Path("/etc/pgbosh/director-ca.pem")
    assert c.client_id == "pgbosh"
    assert c.client_secret == Secret("from-a-kubernetes-secret")
    assert c.tls is True and c.postgres_port == 6432 and c.token_refresh_margin == 30.0
    assert c.initial_databases == ("app", "reports")
    assert "from-a-kubernetes-secret" not in repr(c)


def test_from_env_secret_variable_and_empty_env() -> None:
    assert BoshConfig.from_env({}) == BoshConfig()
    assert BoshConfig.from_env({"PGBOSH_BOSH_CLIENT_SECRET": "x"}).client_secret == Secret("x")


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=6, base_delay=0.5, max_delay=3, jitter=0.5)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(4, draw=0.5) == 3.0 * 0.75
    assert RetryPolicy(jitter=0).delay(2, draw=0.9) == 1.0
