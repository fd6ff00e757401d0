"""`odyssey cluster netns-up | netns-down`: a Ray cluster of hosts with addresses of their own, on one
Linux machine (root), for trying multi-host behaviour where there is one machine: joining a head over a
network with token auth, gloo finding the right interface, a host that vanishes mid-run.

Each host is a network namespace with one interface, eth0, and an address of a /24 that overlaps no
address or route of the machine. The hosts' links meet on a bridge that lives in a namespace of its
own, so no packet between hosts crosses the machine's own interfaces, and no host has a route to
anything but the bridge's /24 and its own loopback. Hosts share the machine's file system (the
"shared storage" of a real cluster: checkpoints, data, the token file).

Host 0 runs the Ray head (GCS, dashboard and jobs API on its address, 0 CPUs: no training or model
replica lands there); the others join it with `ray start --address` and `--node-ip-address`, all with
token authentication. `crash(i)` takes host i's link down and SIGKILLs every process in it: a host lost
to the network, not a clean exit. `restore(i)` brings the link back and joins the host again.

Everything the harness creates is named after its prefix (`{prefix}-net`, `{prefix}-h0`, ...) and
recorded in $ODYSSEY_HOME/hosts/{prefix}.json, so `down(prefix)` removes it all, even after the process
that created it died.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from odyssey import atomic, cluster
from odyssey.errors import OdysseyError

GCS_PORT, DASHBOARD_PORT = 6379, 8265
# How soon the head calls a silent host dead (Ray's defaults: 3 s x 5 misses, after a 5 s delay). A
# crashed host sends nothing more, so this bounds how long a run waits before it restarts without it.
HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}


@dataclass
class Host:
    netns: str  # the network namespace: `ip netns exec {netns} ...` runs a process "on" the host
    address: str  # its eth0's
    link: str  # its link's name on the bridge (in the bridge's namespace)
    cpus: int  # the Ray node's logical CPUs
    temp_dir: str  # its Ray node's (as a separate machine would have one of its own)


@dataclass
class Hosts:
    prefix: str
    subnet: str
    bridge: str  # the bridge's namespace
    token_path: str  # Ray's token, owner-only, where every host reads it (shared storage)
    hosts: list[Host] = field(default_factory=list)

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.address}:{DASHBOARD_PORT}"

    # --- processes on a host ----------------------------------------------------------------------

    def env(self, **extra: str) -> dict:
        """The environment of a Ray process or client on a host: token auth with the cluster's token,
        and Ray's multi-machine mode. PATH stays as it is: a virtual environment's bin first would swap
        the ninja that builds DeepSpeed's ops, and every switch rebuilds them (a minute and more)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.pop(cluster.SINGLE_MACHINE, None)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=self.token_path,
            RAY_ADDRESS=self.gcs_address,
            RAY_API_SERVER_ADDRESS=self.dashboard_url,  # `ray job ...`
            RAY_DASHBOARD_ADDRESS=self.dashboard_url,  # `serve deploy|status`
            **extra,
        )
        return env

    def command(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i].netns, *argv]

    def run(self, i: int, argv: list[str], env: dict | None = None, timeout: float = 600, **kw):
        """Run argv on host i to its end (output captured)."""
        return subprocess.run(
            self.command(i, argv),
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def popen(self, i: int, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Start argv on host i (it runs until it ends or the host is lost)."""
        return subprocess.Popen(self.command(i, argv), env=env or self.env(), **kw)

    def pids(self, i: int) -> list[int]:
        out = _ip("netns", "pids", self.hosts[i].netns, check=False).stdout.split()
        return [int(p) for p in out]

    def listeners(self, i: int) -> list[tuple[str, int, str]]:
        """(address, port, process) of every listening TCP socket on host i: what it exposes."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.hosts[i].netns, "ss", "-H", "-ltnp"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found = []
        for line in out.splitlines():
            cols = line.split()
            address, port = cols[3].rsplit(":", 1)
            name = cols[5].split('"')[1] if len(cols) > 5 and '"' in cols[5] else "?"
            found.append((address.strip("[]"), int(port), name))
        return found

    def exposure(self, i: int) -> dict[str, list[tuple[str, int, str]]]:
        """Host i's listening sockets by where they listen: its own address, loopback, every interface
        (on a host, as wide as its addresses: here its own and loopback), or anywhere else."""
        own = {self.hosts[i].address, f"::ffff:{self.hosts[i].address}"}
        out = {"own": [], "loopback": [], "wildcard": [], "other": []}
        for sock in self.listeners(i):
            where = (
                "own" if sock[0] in own
                else "loopback" if sock[0] in ("127.0.0.1", "::1", "::ffff:127.0.0.1")
                else "wildcard" if sock[0] in ("0.0.0.0", "*", "::")
                else "other"
            )  # fmt: skip
            out[where].append(sock)
        return out

    # --- Ray on the hosts ------------------------------------------------------------------------

    def start_ray(self, i: int, wait_s: float = 90) -> None:
        """Start host i's Ray node (the head on host 0, else a node that joins it) and wait until the
        cluster counts it."""
        host = self.hosts[i]
        argv = [
            ray_cli(), "start", f"--node-ip-address={host.address}", f"--num-cpus={host.cpus}",
            f"--temp-dir={host.temp_dir}", "--disable-usage-stats", "--object-store-memory=200000000",
        ]  # fmt: skip
        if i == 0:
            argv += ["--head", f"--port={GCS_PORT}", "--include-dashboard=true"]
            argv += [f"--dashboard-host={host.address}", f"--dashboard-port={DASHBOARD_PORT}"]
        else:
            argv += [f"--address={self.gcs_address}"]
        done = self.run(i, argv, env=self.env(**HEALTH_CHECK), timeout=wait_s)
        if done.returncode:
            raise OdysseyError(
                f"ray start on {host.netns} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        deadline = time.monotonic() + wait_s
        while host.address not in self.alive_addresses():
            if time.monotonic() > deadline:
                raise OdysseyError(f"{host.netns}'s Ray node did not join within {wait_s:.0f} s")
            time.sleep(1)

    def alive_addresses(self) -> list[str]:
        """The addresses of the Ray nodes the head counts alive (asked from the head's host)."""
        script = (
            "import json, ray; ray.init(logging_level='ERROR'); "
            "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))"
        )
        done = self.run(0, [sys.executable, "-c", script], timeout=60)
        if done.returncode:
            return []
        return json.loads(done.stdout.strip().splitlines()[-1])

    def crash(self, i: int) -> None:
        """Host i is lost: its link goes down first (nothing it does reaches anyone any more), then
        every process on it is SIGKILLed. Nothing exits cleanly; the head learns of it by silence."""
        _ip("-n", self.bridge, "link", "set", self.hosts[i].link, "down")
        _kill_all(self, i)

    def restore(self, i: int) -> None:
        """Host i comes back: link up, its Ray node started again (a fresh node, as after a reboot)."""
        shutil.rmtree(self.hosts[i].temp_dir, ignore_errors=True)
        _ip("-n", self.bridge, "link", "set", self.hosts[i].link, "up")
        self.start_ray(i)

    def save(self) -> Path:
        path = record(self.prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(asdict(self), indent=1) + "\n")
        return path


def ray_cli() -> str:
    """This environment's `ray` command."""
    return str(Path(sys.executable).parent / "ray")


def record(prefix: str) -> Path:
    return cluster.home() / "hosts" / f"{prefix}.json"


def up(prefix: str = "odyssey", n: int = 3, cpus: int = 2, start_ray: bool = True) -> Hosts:
    """Create n hosts on a bridge (and, with start_ray, the Ray cluster on them). A failure part way
    removes whatever was created."""
    check_can_create(prefix)
    subnet = free_subnet()
    addresses = list(subnet.hosts())
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))  # short: Ray's socket paths
    token = root / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    hosts = Hosts(prefix, str(subnet), f"{prefix}-net", str(token))
    for i in range(n):
        head = i == 0
        hosts.hosts.append(
            Host(f"{prefix}-h{i}", str(addresses[i]), f"h{i}", 0 if head else cpus, str(root / f"h{i}"))
        )
    hosts.save()  # first: `down` must find what a failure below leaves
    try:
        _ip("netns", "add", hosts.bridge)
        _ip("-n", hosts.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", hosts.bridge, "link", "set", "br0", "up")
        for host in hosts.hosts:
            _ip("netns", "add", host.netns)
            _ip(
                "-n",
                hosts.bridge,
                "link",
                "add",
                host.link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.netns,
            )
            _ip("-n", hosts.bridge, "link", "set", host.link, "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{subnet.prefixlen}", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _write_name_service(hosts, host)
        if start_ray:
            for i in range(n):
                hosts.start_ray(i)
    except BaseException:
        down(prefix)
        raise
    return hosts


@contextlib.contextmanager
def running(prefix: str, n: int = 3, cpus: int = 2, start_ray: bool = True) -> Iterator[Hosts]:
    """`up`, then `down` however the block ends (a failed assertion, an error, Ctrl-C)."""
    try:
        yield up(prefix, n, cpus, start_ray)
    finally:
        down(prefix)


def load(prefix: str) -> Hosts | None:
    try:
        data = json.loads(record(prefix).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Hosts(**{**data, "hosts": [Host(**h) for h in data["hosts"]]})


def down(prefix: str = "odyssey") -> list[str]:
    """Remove every host of `prefix`: their processes (SIGKILL), namespaces and temp dirs, the record.
    Also what a crashed harness left without a record (namespaces named after the prefix). Returns the
    namespaces removed."""
    hosts = load(prefix)
    names = set(_netns_names(prefix))
    if hosts is not None:
        for i in range(len(hosts.hosts)):
            _kill_all(hosts, i)
        names |= {h.netns for h in hosts.hosts} | {hosts.bridge}
        shutil.rmtree(Path(hosts.token_path).parent, ignore_errors=True)
    for name in sorted(names & set(_netns_names(prefix))):
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "delete", name, check=False)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
    record(prefix).unlink(missing_ok=True)
    return sorted(names)


def check_can_create(prefix: str) -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        raise OdysseyError("hosts on one machine are Linux network namespaces: run this as root on Linux")
    if shutil.which("ip") is None or shutil.which("ss") is None:
        raise OdysseyError("`ip` and `ss` are needed (the iproute2 package)")
    if _netns_names(prefix) or record(prefix).exists():
        raise OdysseyError(
            f"hosts named {prefix}-* are up already: remove them with `odyssey cluster netns-down --prefix {prefix}`"
        )


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.0.0.0/8 that overlaps none of the machine's addresses and routes, nor another
    harness's hosts."""
    taken = []
    for kind in ("addr", "route"):
        for entry in json.loads(_ip("-j", kind).stdout or "[]"):
            for info in entry.get("addr_info", [entry]):
                with contextlib.suppress(ValueError, KeyError):
                    if kind == "addr":
                        taken.append(
                            ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
                        )
                    elif entry["dst"] != "default":
                        taken.append(ipaddress.ip_network(entry["dst"], strict=False))
    for path in (cluster.home() / "hosts").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            taken.append(ipaddress.ip_network(json.loads(path.read_text())["subnet"]))
    for third in range(0, 256):
        candidate = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(candidate.overlaps(t) for t in taken if t.version == 4):
            return candidate
    raise OdysseyError("no free /24 in 10.213.0.0/16 for the hosts")


def _write_name_service(hosts: Hosts, host: Host) -> None:
    """The host's own /etc/hosts and /etc/resolv.conf (`ip netns exec` mounts /etc/netns/NAME/* over
    /etc): the machine's hostname and every host's name resolve to addresses on the bridge, and no
    DNS server is configured, since none is reachable from the bridge: a lookup fails at once instead
    of waiting out the machine's resolver (gloo, torch and DeepSpeed look names up)."""
    etc = Path("/etc/netns") / host.netns
    etc.mkdir(parents=True, exist_ok=True)
    lines = ["127.0.0.1 localhost", f"{host.address} {socket.gethostname()}"]
    lines += [f"{h.address} {h.netns}" for h in hosts.hosts]
    (etc / "hosts").write_text("\n".join(lines) + "\n")
    (etc / "resolv.conf").write_text("# no DNS on the hosts' bridge\noptions timeout:1 attempts:1\n")


def _kill_all(hosts: Hosts, i: int) -> None:
    for _ in range(3):  # processes may be starting children while they are killed
        pids = hosts.pids(i)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _netns_names(prefix: str) -> list[str]:
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    names = [line.split()[0] for line in listed if line.strip()]
    return [n for n in names if n == f"{prefix}-net" or n.startswith(f"{prefix}-h")]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        raise OdysseyError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done
