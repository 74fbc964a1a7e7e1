"""Where everything of one node lives (docs/local-world.md fixes these paths)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.node.config import AgentConfig

PG_LIB_ROOT = Path("/usr/lib/postgresql")


@dataclass(frozen=True)
class NodeLayout:
    vm_dir: Path
    persistent_disk: Path
    major_version: int

    @classmethod
    def for_config(cls, config: AgentConfig, major_version: int) -> NodeLayout:
        return cls(vm_dir=config.vm_dir, persistent_disk=config.persistent_disk, major_version=major_version)

    # --- ephemeral (VM) side: recreated with every VM ---------------------------
    @property
    def agent_socket(self) -> Path:
        return self.vm_dir / "agent.sock"

    @property
    def agent_log(self) -> Path:
        return self.vm_dir / "agent.log"

    @property
    def socket_dir(self) -> Path:
        return self.vm_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.vm_dir / "log"

    @property
    def postgres_log(self) -> Path:
        return self.log_dir / "postgres.log"

    @property
    def repmgr_log(self) -> Path:
        return self.log_dir / "repmgr.log"

    @property
    def repmgr_conf(self) -> Path:
        return self.vm_dir / "repmgr.conf"

    @property
    def repmgrd_pid_file(self) -> Path:
        return self.socket_dir / "repmgrd.pid"

    @property
    def pgpass(self) -> Path:
        return self.vm_dir / ".pgpass"

    # --- persistent disk: survives VM recreation --------------------------------
    @property
    def postgres_root(self) -> Path:
        return self.persistent_disk / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.postgres_root / "data"

    @property
    def provisioned_marker(self) -> Path:
        """Written once bootstrap or clone and repmgr registration completed: a data
        directory without it is a half-done provisioning, not a node to start."""
        return self.postgres_root / "pgbosh-provisioned"

    # --- binaries ---------------------------------------------------------------
    @property
    def bindir(self) -> Path:
        return PG_LIB_ROOT / str(self.major_version) / "bin"

    def binary(self, name: str) -> Path:
        # Debian's /usr/bin/repmgr is a version-picking wrapper; the cluster's own
        # binaries live next to postgres.
        return self.bindir / name

    def data_dir_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def data_dir_is_standby(self) -> bool:
        return (self.data_dir / "standby.signal").exists()
