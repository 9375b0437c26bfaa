"""Sending messages and waiting for the replies, with progress, until a deadline.

On a busy machine nodes start slowly (a Ray actor importing torch, a SuperNode's ClientApp
process starting): a run waits for them, says every ``PROGRESS_EVERY`` seconds whom it is
still waiting for, and counts a node as failed only when it answers with an error or the
deadline passes — never because it was slow to start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

PROGRESS_EVERY = 30.0  # seconds between "still waiting for …" lines
MAX_NAMED = 5  # nodes named in one progress line
MAX_POLL = 0.05  # seconds between pulls once a wait is long (after a reply: every ~10 ms again)

Reporter = Callable[[str], None]


def waiting_line(what: str, done: int, total: int, pending: Iterable[str], left: float) -> str:
    """``train round 3: 8/10 replied; waiting up to 540s more for node 12 (partition 3), …``"""
    names = sorted(pending)
    shown = ", ".join(names[:MAX_NAMED]) + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")
    return f"{what}: {done}/{total} replied; waiting up to {left:.0f}s more for {shown}"


def send_and_wait(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    say: Reporter,
    what: str,
    name_of: Callable[[int], str] = lambda node: f"node {node}",
) -> list[Message]:
    """``grid.send_and_receive`` with progress lines: push ``messages``, pull replies until all
    came or ``timeout`` seconds passed; returns the replies that came."""
    if not messages:
        return []
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
    pending = set(ids)
    replies: list[Message] = []
    start = time.monotonic()
    deadline, next_report, interval = start + timeout, start + PROGRESS_EVERY, 0.01
    while pending:
        got = list(grid.pull_messages(list(pending)))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        now = time.monotonic()
        if not pending or now >= deadline:
            break
        if now >= next_report:
            say(waiting_line(what, len(ids) - len(pending), len(ids), (name_of(node_of[m]) for m in pending), deadline - now))
            next_report = now + PROGRESS_EVERY
        time.sleep(min(interval, max(deadline - now, 0.0)))
        interval = min(interval * 1.5, MAX_POLL) if not got else 0.01
    return replies
