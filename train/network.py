"""Which network interface a rank's collectives use: the one that holds its Ray node's address.

gloo (and NCCL's bootstrap) otherwise pick an interface by resolving the machine's hostname, which on a
real cluster can name a public interface, a docker bridge or 127.0.1.1, and on hosts that share one
hostname (network namespaces, some container setups) an address the host does not even have: the
process group then hangs or fails to connect. Ray already knows the address its nodes reach each
other on (`ray start --node-ip-address`, or the one Ray detected), so every rank sets
GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface holding it before the process group
starts. Either variable set by the operator (in the job's or the worker's environment) is kept.

On an embedded cluster the node's address is loopback, so the ranks talk over `lo` and nothing of the
run listens on the network.
"""

from __future__ import annotations

import ipaddress
import os

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_of(address: str) -> str | None:
    """The name of the interface that holds `address` on this host (None if none does)."""
    import psutil

    wanted = ipaddress.ip_address(address)
    for name, addresses in psutil.net_if_addrs().items():
        for a in addresses:
            try:
                if ipaddress.ip_address(a.address.split("%")[0]) == wanted:
                    return name
            except ValueError:
                continue  # a MAC address
    return None


def pin_interfaces() -> dict[str, str]:
    """On a worker, before its process group starts: the collectives' interface variables (kept when
    set), returned for the record."""
    import ray

    address = ray.util.get_node_ip_address()
    name = interface_of(address)
    if name is None:
        raise RuntimeError(
            f"no network interface of this host holds its Ray node address {address}; start the node with "
            "`ray start --node-ip-address=<an address of this host>`, or set GLOO_SOCKET_IFNAME"
        )
    for variable in VARIABLES:
        os.environ.setdefault(variable, name)
    return {v: os.environ[v] for v in VARIABLES}


class _PinnedBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(pin_interfaces)
        super().on_start(worker_group, backend_config)


class PinnedTorchConfig(TorchConfig):
    """Ray Train's TorchConfig, whose workers first pin their collectives to the node's interface."""

    @property
    def backend_cls(self):
        return _PinnedBackend
