"""A private Redis Cluster for tests: three primaries on loopback, no persistence, no replicas."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from loadtest.bench import free_port

_READY = "Ready to accept connections"
_CLUSTER_OK = "Cluster state changed: ok"  # logged by each node when it starts serving slots


class _Node:
    """One ``redis-server --cluster-enabled yes``; a thread reads its log as it is written."""

    def __init__(self, workdir: Path, port: int, bus_port: int) -> None:
        self.port = port
        self.log: list[str] = []
        self.ready = threading.Event()
        self.cluster_ok = threading.Event()
        self.exited = False  # its log ended: the process is gone or going
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             # The bus port defaults to port + 10000, which can exceed 65535 for an
             # ephemeral port, or be taken: pick a free one explicitly (redis >= 7.0).
             "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
             "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
             "--save", "", "--appendonly", "no", "--dir", str(workdir),
             "--loglevel", "notice"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Reading continues for the node's whole life: an undrained pipe would
        # eventually block the server on its own log writes.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if _READY in line:
                self.ready.set()
            elif _CLUSTER_OK in line:
                self.cluster_ok.set()
        # The process is gone: wake whoever waits, who then sees it did not happen.
        self.exited = True
        self.ready.set()
        self.cluster_ok.set()

    def wait(self, event: threading.Event, what: str, timeout: float) -> None:
        """Block until the node logs ``what``; fail with its log if it exits or never does."""
        if not event.wait(timeout) or self.exited:
            raise RuntimeError(f"redis-server :{self.port} never logged {what!r}:\n"
                               + "".join(self.log))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(10)


class LocalRedisCluster:
    """Three cluster-enabled ``redis-server`` primaries joined into one cluster.

    ``start`` returns once every node reports ``cluster_state:ok``, so the
    first client command does not meet CLUSTERDOWN.
    """

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.size = size
        self.ports: list[int] = []
        self._nodes: list[_Node] = []

    @property
    def url(self) -> str:
        """A seed node for ``RedisCluster.from_url``, which discovers the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 30) -> None:
        """Start the nodes, assign all 16384 slots across them, wait until all serve."""
        try:
            for _ in range(self.size):  # one by one, so stop() sees each started node
                self._nodes.append(_Node(self.workdir, free_port(), free_port()))
            self.ports = [n.port for n in self._nodes]
            for node in self._nodes:
                node.wait(node.ready, _READY, timeout)
            # create assigns the slots, introduces the nodes, and itself waits
            # ("Waiting for the cluster to join") until they agree on the config.
            subprocess.run(
                ["redis-cli", "--cluster", "create",
                 *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, text=True, timeout=timeout)
            # A primary stays in cluster_state:fail for a moment after that (redis
            # waits out its rejoin delay): its own log line marks the switch to ok.
            for node in self._nodes:
                node.wait(node.cluster_ok, _CLUSTER_OK, timeout)
            for port in self.ports:
                info = self.cli(port, "CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    raise RuntimeError(f"node :{port} is not ok after joining:\n{info}")
        except BaseException:
            self.stop()
            raise

    def cli(self, port: int, *command: str) -> str:
        """Run one command on one node (no redirections followed) and return its output."""
        done = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *command],
                              check=True, capture_output=True, text=True, timeout=10)
        return done.stdout

    def stop(self) -> None:
        """Terminate every node (their config files stay in ``workdir``)."""
        for node in self._nodes:
            node.stop()
        self._nodes = []
