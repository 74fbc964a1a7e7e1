"""pgbosh's local Consul-compatible agent (HTTP API subset and DNS)."""

from controller.local.consul.server import ConsulServer, serve_in_thread

__all__ = ["ConsulServer", "serve_in_thread"]
