"""server/raylet_lookup.py: ray.init's lookup of its new raylet waits on a 20 ms poll of the
GCS's node table (Ray's own lookup retries once per second), and falls through to Ray's lookup."""

from __future__ import annotations

import ray._private.services as services

from server import raylet_lookup

NODE = "ab" * 28  # a node id in hex, as Ray passes it


def _registers_after(polls: int, calls: list[str]):
    """A node table that lists NODE from the ``polls``-th poll on."""

    def node_ids() -> list[bytes]:
        calls.append("poll")
        return [bytes.fromhex(NODE)] if calls.count("poll") >= polls else [b"\x01" * 28]

    return node_ids


def test_wait_returns_at_the_poll_that_sees_the_node():
    calls: list[str] = []
    assert raylet_lookup.wait_until_registered(_registers_after(4, calls), NODE, wait_s=30, poll_s=0.001)
    assert calls == ["poll"] * 4


def test_wait_gives_up_at_its_deadline():
    calls: list[str] = []
    assert not raylet_lookup.wait_until_registered(_registers_after(10**9, calls), NODE, wait_s=0.05, poll_s=0.01)
    assert 1 <= len(calls) <= 10


def test_rays_lookup_runs_after_the_node_registered_and_is_restored(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(raylet_lookup, "_gcs_node_ids", lambda address: _registers_after(3, calls))
    monkeypatch.setattr(raylet_lookup, "POLL_S", 0.001)

    def rays_lookup(gcs_address: str, node_id: str) -> dict:
        calls.append(f"ray {gcs_address} {node_id}")
        return {"node_id": node_id}

    monkeypatch.setattr(services, "get_node", rays_lookup)
    with raylet_lookup.prompt_raylet_lookup():
        assert services.get_node("127.0.0.1:6379", NODE) == {"node_id": NODE}
    assert calls == ["poll", "poll", "poll", f"ray 127.0.0.1:6379 {NODE}"]
    assert services.get_node is rays_lookup  # restored


def test_a_failing_poll_falls_through_to_rays_lookup(monkeypatch):
    def broken(address: str):
        raise RuntimeError("no GCS client here")

    monkeypatch.setattr(raylet_lookup, "_gcs_node_ids", broken)
    monkeypatch.setattr(services, "get_node", lambda gcs_address, node_id: "found by Ray")
    with raylet_lookup.prompt_raylet_lookup():
        assert services.get_node("127.0.0.1:6379", NODE) == "found by Ray"
