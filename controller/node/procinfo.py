"""Process and machine figures from /proc, in the shapes BOSH's agent reports."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces.
    return raw[raw.rfind(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True for a live process; a zombie is dead for our purpose."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _boot_uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def _mem_total_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 1


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


@dataclass
class CpuSampler:
    """cpu.total as a percentage of the whole machine since the previous sample."""

    _last: dict[int, tuple[float, float]] = field(default_factory=dict)

    def percent(self, pid: int, cpu_seconds: float, uptime_seconds: float) -> float:
        now = time.monotonic()
        previous = self._last.get(pid)
        self._last[pid] = (now, cpu_seconds)
        if previous is None:
            elapsed, used = uptime_seconds, cpu_seconds
        else:
            elapsed, used = now - previous[0], cpu_seconds - previous[1]
        if elapsed <= 0:
            return 0.0
        return round(100.0 * used / elapsed / (os.cpu_count() or 1), 1)


def process_figures(pid: int, sampler: CpuSampler) -> dict[str, object]:
    """uptime, mem and cpu of a process and its direct children (postgres backends)."""
    fields = _stat_fields(pid)
    if fields is None:
        return {"uptime": {"secs": 0}, "mem": {"kb": 0, "percent": 0.0}, "cpu": {"total": 0.0}}
    started = int(fields[19]) / CLOCK_TICKS
    uptime = max(0.0, _boot_uptime() - started)
    rss_kb = 0
    cpu_ticks = 0
    for member in [pid, *_children_of(pid)]:
        member_fields = _stat_fields(member)
        if member_fields is None:
            continue
        rss_kb += int(member_fields[21]) * PAGE_KB
        cpu_ticks += int(member_fields[11]) + int(member_fields[12])
    return {
        "uptime": {"secs": int(uptime)},
        "mem": {"kb": rss_kb, "percent": round(100.0 * rss_kb / _mem_total_kb(), 1)},
        "cpu": {"total": sampler.percent(pid, cpu_ticks / CLOCK_TICKS, uptime)},
    }


def _disk(path: Path) -> dict[str, str]:
    try:
        stats = os.statvfs(path)
    except OSError:
        return {"percent": "0", "inode_percent": "0"}
    used = 1 - stats.f_bavail / stats.f_blocks if stats.f_blocks else 0.0
    inodes = 1 - stats.f_favail / stats.f_files if stats.f_files else 0.0
    return {"percent": str(round(100 * used)), "inode_percent": str(round(100 * inodes))}


def vitals(ephemeral: Path, persistent: Path) -> dict[str, object]:
    load = Path("/proc/loadavg").read_text().split()[:3]
    meminfo = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    total = meminfo.get("MemTotal", 1)
    used = total - meminfo.get("MemAvailable", total)
    swap_total = meminfo.get("SwapTotal", 0)
    swap_used = swap_total - meminfo.get("SwapFree", 0)
    return {
        "load": load,
        "mem": {"kb": str(used), "percent": str(round(100 * used / total))},
        "swap": {"kb": str(swap_used), "percent": str(round(100 * swap_used / swap_total) if swap_total else 0)},
        "disk": {"ephemeral": _disk(ephemeral), "persistent": _disk(persistent)},
        "uptime": {"secs": int(_boot_uptime())},
    }
