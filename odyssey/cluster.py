"""How Odyssey reaches Ray: join the cluster it is given, or start an embedded one that is safe by
default (token authentication on, loopback only).

Ray reads RAY_AUTH_MODE when it is imported, so `connect` must run before the first `import ray`
of the process (the entry points call it first).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from odyssey import atomic, logs
from odyssey.errors import OdysseyError

# "0": Ray's single-machine mode (its default on macOS): node addresses stay on loopback.
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

log = logging.getLogger(__name__)


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS, as inside `ray job submit`); else start an embedded cluster.
    Inside a Ray worker (a Tune trial), or once connected, there is nothing to do."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    logs.quiet_driver()  # before Ray is imported: it reads which forwarded lines to drop then
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if address and address.split("://")[-1].rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]"):
        # A head on loopback (start_head): without this Ray rewrites the address to the machine's own.
        os.environ.setdefault(SINGLE_MACHINE, "0")
    token = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else _token_file()  # where it is, or None
    if not address:
        if token is None:  # this embedded cluster's own token, for this process alone
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        # Single-machine mode: without it the GCS, raylet and agents listen on every interface (and on
        # the machine's address) although the node's address is loopback. Ray reads the switch when it
        # is imported: a process that imported it before this call gets its copy set too.
        os.environ.setdefault(SINGLE_MACHINE, "0")
        if "ray" in sys.modules and os.environ[SINGLE_MACHINE] == "0":
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        # Ray runs workers at nice 15 by default; in an embedded cluster the workers are the job, and on a
        # small machine every preemption of one compute thread stalls its peers at the next barrier.
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # The dashboard too, on loopback: it shows the run, and Ray Train's placement-group cleaner asks its
    # state API whether the run's controller is alive. Every process of the cluster inherits this
    # environment, so RAY_API_SERVER_ADDRESS points that API here: left to itself it would guess the
    # cluster from /tmp/ray/ray_current_cluster, which any earlier `ray start` may have left behind.
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,  # "Started a local Ray instance": the line below says more
    )
    if context.dashboard_url:
        how = (
            f"it asks for the token in {token}: `ray get-auth-token` prints it"
            if token
            else "a one-off token; set RAY_AUTH_TOKEN before launching to log in"
        )
        print(f"embedded Ray cluster: dashboard at http://{context.dashboard_url} ({how})", file=sys.stderr)


def disconnect() -> None:
    """Leave Ray (and stop the embedded cluster, if this process started one)."""
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


def _token_file() -> str | None:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return path if os.path.isfile(path) else None


def home() -> Path:
    """Where Odyssey's commands remember the local clusters they started (ODYSSEY_HOME, ~/.odyssey)."""
    return Path(os.environ.get("ODYSSEY_HOME", Path.home() / ".odyssey"))


def checkout() -> Path:
    """The checkout a command belongs to: the source tree of the running `odyssey` package (a clone with
    an editable install, as `make` sets up), else the current directory (an installed package)."""
    tree = Path(__file__).resolve().parent.parent
    return tree if (tree / "pyproject.toml").is_file() else Path.cwd().resolve()


def state_file(role: str, home_dir: Path | None = None) -> Path:
    """Where the command `role` (serve, demo, local) of this checkout records the local cluster it
    started: one file per checkout and command, so that no command joins or stops a cluster that another
    checkout, or another command, started."""
    tree = checkout()
    key = f"{tree.name}-{hashlib.sha256(str(tree).encode()).hexdigest()[:10]}"
    return (home_dir or home()) / "clusters" / key / f"{role}.json"


def recorded(role: str) -> LocalHead | None:
    """The live local cluster that `role` of this checkout started, if any (a stale record is dropped)."""
    path = state_file(role)
    head = LocalHead.load(path)
    if head is not None and not head.alive():
        path.unlink(missing_ok=True)
        return None
    return head


def stop_recorded(role: str, none_up: str, head: LocalHead | None = None) -> LocalHead:
    """Stop the local cluster that `role` of this checkout started (or `head`) and forget its record.
    `none_up`: the error when there is none (where other checkouts' clusters are is added)."""
    head = head or recorded(role)
    if head is None:
        raise OdysseyError(none_up + elsewhere_hint(role))
    stop_head(head)
    state_file(role).unlink(missing_ok=True)
    return head


def recorded_elsewhere(role: str) -> list[LocalHead]:
    """Live local clusters that `role` started in other checkouts (for error messages that say where)."""
    mine = state_file(role)
    heads = (LocalHead.load(p) for p in sorted(home().glob(f"clusters/*/{role}.json")) if p != mine)
    return [h for h in heads if h is not None and h.alive()]


def elsewhere_hint(role: str) -> str:
    others = recorded_elsewhere(role)
    if not others:
        return ""
    listed = "; ".join(f"{h.checkout} (dashboard {h.dashboard_url})" for h in others)
    return f". Other checkouts' clusters (run the command there, or pass --address): {listed}"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports on loopback that nothing listens on right now (all held while choosing:
    a port closed and asked for again can come back)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


# ---------------------------------------------------------------------------------------------------
# A head node of its own, outliving the command that started it (`odyssey serve`, tests)


@dataclass
class LocalHead:
    """A `ray start --head --block` process on loopback and where to reach it."""

    pid: int
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    checkout: str = ""  # the checkout whose command started it

    def alive(self) -> bool:
        """Whether the head still runs (a pid that a later process reused is not it)."""
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        cmdline = Path(f"/proc/{self.pid}/cmdline")
        if cmdline.exists():  # Linux: the process must be this head's `ray start --temp-dir=...`
            with contextlib.suppress(OSError):
                return f"--temp-dir={self.temp_dir}".encode() in cmdline.read_bytes()
        return True

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> LocalHead | None:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


def ensure_token() -> None:
    """Token auth needs a token every client of the cluster can find: RAY_AUTH_TOKEN, the file at
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. With none, write the last one (owner-only), as
    `ray get-auth-token --generate` would."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN") or _token_file():
        return
    path = Path(os.path.expanduser("~/.ray/auth_token"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    print(f"wrote a new Ray auth token to {path}", file=sys.stderr)


def keep_ray_helpers_here() -> None:
    """Create Ray's per-cluster helper actors from this process (a job's driver: the head node).

    Ray Data's stats actor and the autoscaling coordinator (which Ray Train's elastic policy asks what
    the cluster can hold) are detached and pinned to the node of whichever process creates them first.
    Left to a training worker they land on a GPU node and keep it from ever scaling down. Created here
    they live on the head, and the coordinator is up before the run's first question: an elastic run
    starts with the capacity there is now instead of waiting out the actor's start."""
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # a Ray without them: nothing to pin
        return
    get_or_create_stats_actor()
    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator.get_reserved_resources.remote("odyssey-warm-up"), timeout=120)


def start_head(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    wait_s: float = 180,
    autoscaling: dict | None = None,
) -> LocalHead:
    """Start a head node on loopback with token auth, the dashboard, and ports of its own (so that it
    can run beside any other cluster on the machine). It runs in a session of its own: it outlives
    this process until stop_head. `autoscaling`: a `ray up`-style config for the head's autoscaler (the
    fake_multinode provider adds and removes worker nodes on this machine).

    A head that exits while starting (a port taken between choosing it and binding it) is started once
    more on other ports; one that fails again, or is not up within `wait_s`, is an error that quotes
    its log."""
    ensure_token()
    for attempt in (1, 2):
        head, proc = _launch_head(num_cpus, num_gpus, autoscaling)
        deadline = time.monotonic() + wait_s
        ready = _autoscaler_reports if autoscaling is not None else _answers
        while not ready(head.dashboard_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        else:
            return head
        exited, kept = proc.poll() is not None, _keep_log(head)
        stop_head(head)
        if not exited or attempt == 2:  # still starting at the deadline, or failed twice
            why = "exited" if exited else f"was not up after {wait_s:.0f} s"
            raise OdysseyError(f"the Ray head node {why}; its log ({kept}) ends:\n{_tail(kept)}")
        log.warning("the Ray head node exited while starting; starting it again on other ports")
    raise AssertionError("unreachable")


def _launch_head(
    num_cpus: int | None, num_gpus: int | None, autoscaling: dict | None
) -> tuple[LocalHead, subprocess.Popen]:
    """`ray start --head --block` on loopback with fresh ports and a temp dir of its own."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)  # an embedded cluster's (or a shell's), when this process has one
    # `ray start` turns --node-ip-address=127.0.0.1 into the machine's network address, and the servers
    # then listen on every interface. Ray's single-machine mode (what it does on macOS) keeps the node's
    # address, and every server, on loopback: for this head and for any node its autoscaler starts here.
    env[SINGLE_MACHINE] = "0"
    port, dashboard, agent, agent_grpc, runtime_env, metrics, client = free_ports(7)
    # Every process of the cluster inherits this: Ray's state API (Ray Train's placement-group cleaner
    # asks it whether a run's controller lives) then asks this head's dashboard. Left to itself it looks
    # for the Ray instances on the machine and gives up when it finds several (this head beside another
    # one: the demo beside `odyssey serve`).
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    command = [
        str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    if autoscaling is not None:
        command.append(f"--autoscaling-config={_autoscaling_file(autoscaling, env, port, temp_dir)}")
    with open(Path(temp_dir) / "head.log", "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = LocalHead(
        proc.pid, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", temp_dir, str(checkout())
    )
    return head, proc


def _autoscaling_file(autoscaling: dict, env: dict, port: int, temp_dir: str) -> Path:
    """The head's autoscaler config, written into its temp dir (the fake_multinode provider swapped for
    ours, and `env` set for it)."""
    autoscaling = copy.deepcopy(autoscaling)
    if autoscaling["provider"]["type"] == "fake_multinode":
        from odyssey import fake_nodes

        env["RAY_FAKE_CLUSTER"] = "1"
        env.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", "2")  # a laptop's nodes start in seconds
        # Its nodes join the head's GCS here (the provider assumes port 6379 otherwise), each with a
        # runtime-env directory of its own (odyssey/fake_nodes.py says why).
        autoscaling["provider"].update(
            type="external", module=fake_nodes.MODULE, gcs_address=f"127.0.0.1:{port}"
        )
    path = Path(temp_dir) / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(autoscaling, sort_keys=False), encoding="utf-8")
    return path


def _keep_log(head: LocalHead) -> Path:
    """A copy of a failed head's log and Ray's own logs beside it, outside the temp dir stop_head
    removes."""
    kept = Path(tempfile.mkdtemp(prefix="ray-head-failed-", dir="/tmp"))
    with contextlib.suppress(OSError):
        shutil.copy2(Path(head.temp_dir) / "head.log", kept / "head.log")
    with contextlib.suppress(OSError):
        shutil.copytree(Path(head.temp_dir) / "session_latest" / "logs", kept / "logs", symlinks=False)
    return kept / "head.log"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_head(head: LocalHead, timeout: float = 10) -> None:
    """SIGTERM to `ray start --block` stops every process it started, in order (all at once, raylets
    wait for a GCS that is gone); after a job it can take half a minute. Whatever is left of its session
    after `timeout` is killed: slow stragglers, and the nodes its autoscaler started (fake_multinode),
    which outlive it. A local cluster keeps no state worth a longer wait."""
    if head.alive():
        os.kill(head.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while head.alive() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(head.pid, os.WNOHANG)  # reap it when it is our child
            time.sleep(0.2)
    for pid in session_processes(head.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while session_processes(head.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def session_processes(session_id: int) -> list[int]:
    """Processes of a session (a head's `ray start` and everything it and its nodes started)."""
    pids = []
    if not Path("/proc").is_dir():  # not Linux: `ray start --block` alone
        return pids
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # dead, not reaped
                if os.getsid(int(entry.name)) == session_id and not zombie:
                    pids.append(int(entry.name))
    return pids


LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


def listeners(pids: list[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of these processes: what a
    cluster exposes. Anything whose address is not in LOOPBACK is reachable from the network."""
    import psutil

    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out += [
                (c.laddr.ip, c.laddr.port, proc.name())
                for c in proc.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            ]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _answers(dashboard: str) -> bool:
    """Whether the dashboard answers (any status, 401 included)."""
    try:
        urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _autoscaler_reports(dashboard: str) -> bool:
    """Whether the head's autoscaler has reported the cluster's status (what `ray status` prints)."""
    try:
        token = os.environ.get("RAY_AUTH_TOKEN") or Path(_token_file() or "").read_text().strip()
        url, auth = f"{dashboard}/api/cluster_status", {"Authorization": f"Bearer {token}"}
        with urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=2) as response:
            return bool(json.loads(response.read())["data"].get("autoscalingStatus"))
    except (OSError, ValueError, KeyError):
        return False


# ---------------------------------------------------------------------------------------------------
# `odyssey cluster env`: Ray's own CLI (`ray status`, `ray job ...`, `serve ...`) pointed at a local cluster

ROLES = {"local": "odyssey cluster local-up", "serve": "odyssey serve", "demo": "odyssey demo --keep-serving"}


def token_source() -> str:
    """Where clients find the token: the variable, or the file (`ray get-auth-token` prints it)."""
    return "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else (_token_file() or "~/.ray/auth_token")


def env_lines(role: str | None = None) -> str:
    """`export` lines for a shell: Ray's CLI reaches the local cluster that `role` of this checkout
    started (default: the only one up). Ray rewrites 127.0.0.1 to the machine's network address unless
    its single-machine mode is on, and the cluster listens on loopback alone: hence that variable."""
    up = {r: head for r in ROLES if (head := recorded(r)) is not None}
    if role is None and len(up) > 1:
        raise OdysseyError(
            f"several local clusters are up ({', '.join(up)}): name one, e.g. `odyssey cluster env local`"
        )
    role = role or next(iter(up), "local")
    head = up.get(role)
    if head is None:
        raise OdysseyError(
            f"no {role} cluster of this checkout is up: start one with `{ROLES[role]}`" + elsewhere_hint(role)
        )
    return "\n".join(
        [
            f"# the {role} cluster of {head.checkout or checkout()}; dashboard {head.dashboard_url}",
            f"# (a browser asks for the token: paste what `ray get-auth-token` prints; it is in {token_source()})",
            "export RAY_AUTH_MODE=token",
            f"export {SINGLE_MACHINE}=0",
            f"export RAY_ADDRESS={head.gcs_address}",
            f"export RAY_API_SERVER_ADDRESS={head.dashboard_url}",
            f"export RAY_DASHBOARD_ADDRESS={head.dashboard_url}",
        ]
    )
