"""Keep each replica's internal gRPC server off the network.

Ray Serve 2.60 starts a gRPC server in every replica for calls between deployments, bound to
`[::]:0`: every interface of the machine, and without Ray's token (token auth guards the GCS, the
jobs API and the dashboard, not this server). Whoever reaches the port can call the replica's
methods directly, past the gateway's API keys. By default Serve does not even use it (handles call
replicas through Ray's own authenticated channels unless RAY_SERVE_USE_GRPC_BY_DEFAULT=1).

`bind_internal_server()`, called from each deployment's constructor (which Serve runs before it
starts that server), rebinds it: to loopback by default; to this node's own address when
RAY_SERVE_USE_GRPC_BY_DEFAULT=1, since then other nodes' replicas must reach it. Never to every
interface. tests/reliability/test_exposure_and_auth.py fails if a listener escapes loopback.
"""

from __future__ import annotations

import os


def bind_internal_server() -> None:
    from ray.serve._private import replica

    if getattr(replica.add_port_to_grpc_server, "odyssey_bound", False):
        return
    original = replica.add_port_to_grpc_server
    if os.environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0") == "1":
        import ray

        host = ray.util.get_node_ip_address()
    else:
        host = "127.0.0.1"

    def add_port(server, address: str):
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port.odyssey_bound = True
    replica.add_port_to_grpc_server = add_port
