"""The node provider of `odyssey cluster local-up`: Ray's fake_multinode provider (worker nodes that are
real Ray nodes, started as processes on this machine), with two changes, made for correctness.

Ray's fake nodes share the head's session directory, on real machines every node has its own disk:
- The directory where a node's runtime env agent unpacks a job's `--working-dir`. An agent that has not
  seen the package yet unpacks it with overwrite: it deletes the copy that the head's processes (the
  job's driver, Ray Train's controller) run in, and they fail on their next path lookup. Here every
  added node gets a runtime-env directory of its own, as it would there.
- The log directory. Every node's log monitor forwards every worker log file it finds there to the
  driver, so with two nodes added each line of the job reached `ray job logs` three times. The head's
  monitor already reads the shared directory: added nodes run none.

`start_head` swaps the `fake_multinode` provider of a config for this one (`type: external`), so the
cluster files keep Ray's provider type and schema.
"""

from __future__ import annotations

import uuid

import ray._private.parameter as parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

MODULE = f"{__name__}.FakeNodeProvider"


class FakeNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # The parent builds the node's RayParams inline: a runtime-env directory of the node's own, and no
        # log monitor of its own. (Called under the provider's lock, in the autoscaler's single process.)
        original = parameter.RayParams

        def own_params(*args, **kwargs):
            kwargs.setdefault("runtime_env_dir_name", f"runtime_resources_{uuid.uuid4().hex[:12]}")
            kwargs.setdefault("include_log_monitor", False)
            return original(*args, **kwargs)

        parameter.RayParams = own_params
        try:
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        finally:
            parameter.RayParams = original
