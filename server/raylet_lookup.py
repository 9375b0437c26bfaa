"""A prompt lookup of the raylet that ``ray.init`` has just started.

After starting its processes, ``ray.init`` asks the GCS for the new raylet through
``ray._private.services.get_node``, i.e. Ray's C++ ``GlobalStateAccessor::GetNode``, which retries
with a fixed one-second sleep. A raylet registers about a second after it starts (it waits for
its agents), so it is found at 2 s rather than at ~1.1 s: up to a second of every simulation's
start-up spent asleep. :func:`prompt_raylet_lookup` wraps that call, for the duration of one
``ray.init``, with a poll of the GCS's node table every 20 ms; by the time Ray's own lookup runs,
the node is there and it returns at once.

This reaches into Ray's private module (Ray 2.55, the version Flower 1.42 pins). Anything
unexpected (the function missing, the poll failing or timing out after :data:`WAIT_S`) falls
through to Ray's own lookup unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

POLL_S = 0.02
# After this, Ray's own lookup (1 s steps, 30 s) takes over: a raylet slower than this on a busy
# machine is still found, and one that never registers fails 10 s later than without this module.
WAIT_S = 10.0


def wait_until_registered(node_ids: Callable[[], list[bytes]], node_id_hex: str, wait_s: float = WAIT_S, poll_s: float = POLL_S) -> bool:
    """Poll ``node_ids()`` (the GCS's registered node ids) until ``node_id_hex`` is among them;
    False when ``wait_s`` passed first."""
    target = bytes.fromhex(node_id_hex)
    deadline = time.monotonic() + wait_s
    while True:
        if target in node_ids():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def _gcs_node_ids(gcs_address: str) -> Callable[[], list[bytes]]:
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled module without stubs

    client = GcsClient(address=gcs_address)
    return lambda: [node_id.binary() for node_id in client.get_all_node_info(timeout=5)]


@contextmanager
def prompt_raylet_lookup() -> Iterator[None]:
    """While active, Ray's ``services.get_node`` first waits (20 ms steps) for the node to register."""
    try:
        import ray._private.services as services
    except ImportError:
        yield
        return
    original: Callable[..., Any] | None = getattr(services, "get_node", None)
    if original is None:
        yield
        return

    def get_node(gcs_address: str, node_id: str) -> Any:
        try:
            wait_until_registered(_gcs_node_ids(gcs_address), node_id)
        except Exception:  # noqa: BLE001 - any surprise: Ray's own lookup decides
            pass
        return original(gcs_address, node_id)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original
