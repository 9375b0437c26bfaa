"""A warm ClientApp process for a SuperNode: one long-lived process runs every message.

Flower 1.42's ``flower-supernode`` (default ``--isolation subprocess``) starts a fresh
``flwr-clientapp`` process for every message; that process imports torch, imports the app,
loads its partition, handles one message and exits (``flwr.supernode.runtime.run_clientapp``
ends in ``flwr_exit``). On 2 cores that start-up, not the training, dominated a deployed round
(44–64 s for 4 nodes against ~4 s simulated).

With ``--isolation process`` the SuperNode starts no task processes and waits for an external
executor to ``AcquireTask`` on its Runtime API. ``serve`` is that executor: it acquires each
ClientApp task and runs it *in this process*, with the same calls ``run_clientapp`` makes
(pull the task input, install the FAB, load the app, call it, push the reply and the Context),
but without exiting. So imports, the app module and everything it caches in module globals
(data splits, parsed tasks, stacked models, see ``splitmix/data.py``) survive between messages,
as they do in a simulation's Ray actor. Tasks run one at a time (the app's caches are not
thread-safe; the server sends a node one message at a time anyway).

A run with another FAB (new app code) gets its own modules: the previous app's modules are
dropped from ``sys.modules`` and its folder from ``sys.path`` before the new one is loaded, so
only third-party imports (torch, flwr) stay warm across app versions.

``supervise`` is what ``splitmix supernode --warm`` runs: ``flower-supernode --isolation
process`` as a child (its idle poll of the SuperLink adjustable, see ``run_supernode``) and
``serve`` in the foreground, ending (with the child) when either ends or the child stops
answering, so a container restarts the pair as one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # type: ignore[attr-defined]
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullAppMessagesRequest, PullTaskInputRequest  # type: ignore[attr-defined]
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

DEFAULT_RUNTIME_API = "127.0.0.1:9094"


def _runtime_client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker()
    )


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Flower's ``run_clientapp.pull_task_input`` with a short retry backoff (0.05 s, capped at
    0.5 s, instead of 1 s doubling to 10 s).

    A SuperNode creates the task *before* it has pulled the message's objects from the SuperLink.
    A cold ``flwr-clientapp`` spends seconds importing, so the objects are there when it asks; a
    warm process asks at once, finds them "unavailable" and, with Flower's backoff, waited 1 + 2 +
    4 s: 8.5 s of a 12.6 s train task here."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=0.05,
        backoff_cap=0.5,
        max_tries_per_object=None,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run, fab


@dataclass
class WarmApp:
    """The app this process has loaded: its FAB hash and install folder (None before the first task)."""

    fab_hash: str | None = None
    app_dir: Path | None = None
    tasks: int = 0
    loads: int = 0
    _load: Callable = field(default_factory=lambda: get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True))

    def switch_to(self, fab_hash: str, app_dir: Path) -> None:
        """Forget the previous app's modules (imported from its install folder) before another
        FAB is loaded, so its code, not the cached old modules, runs."""
        if self.app_dir is not None and self.app_dir != app_dir:
            old = str(self.app_dir)
            for name, module in list(sys.modules.items()):
                if (getattr(module, "__file__", None) or "").startswith(old + os.sep):
                    del sys.modules[name]
            sys.path[:] = [p for p in sys.path if p != old]
        self.fab_hash, self.app_dir = fab_hash, app_dir

    def run_task(self, address: str, token: str) -> str:
        """One ClientApp task, as ``flwr.supernode.runtime.run_clientapp`` runs it, in this
        process; returns the task's final sub-status. Never raises for the app's errors: they go
        back to the server as an error reply, like a failed ``flwr-clientapp``."""
        client = _runtime_client(address, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message: Message | None = None
        reply: Message | None = None
        context: Context | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        times = [time.perf_counter()]
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            times.append(time.perf_counter())
            if fab.hash_str != self.fab_hash:
                install_from_fab(fab.content, skip_prompt=True)
                self.switch_to(fab.hash_str, get_project_dir(run.fab_id, run.fab_version, fab.hash_str))
                self.loads += 1
            client_app = self._load(run.fab_id, run.fab_version, fab.hash_str)
            times.append(time.perf_counter())
            reply = client_app(message=message, context=context)
            times.append(time.perf_counter())
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # the app's failure is the server's to count, not this process's end
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # the SuperNode went away mid-task
                log(ERROR, "Failed to push reply message", exc_info=ex)
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            self.tasks += 1
            times.append(time.perf_counter())
            kind = message.metadata.message_type if message is not None else "?"
            steps = " ".join(f"{b - a:.2f}" for a, b in zip(times, times[1:]))
            log(INFO, "task %d (%s) %s in %.2f s (pull/load/app/push: %s)", self.tasks, kind, status, times[-1] - times[0], steps)
        return status


def serve(
    address: str = DEFAULT_RUNTIME_API,
    *,
    poll: float = 0.05,  # a local call to the SuperNode: cheap, and a message waits half of it on average
    alive: Callable[[], bool] = lambda: True,
    app: WarmApp | None = None,
    lost_after: float = 120.0,
) -> int:
    """Acquire and run ClientApp tasks from the SuperNode's Runtime API at ``address`` until
    ``alive()`` turns false, or until the API, having answered once, stays silent for
    ``lost_after`` seconds (a SuperNode that hangs on its way out); returns the tasks run."""
    app = app or WarmApp()
    client = _runtime_client(address, "SuperExec")
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    log(INFO, "warm ClientApp process %d serving the Runtime API at %s", os.getpid(), address)
    answered: float | None = None
    try:
        while alive():
            try:
                res = client.AcquireTask(request)
                answered = time.monotonic()
            except Exception as ex:  # the SuperNode is starting: keep polling
                if answered is not None and time.monotonic() - answered > lost_after:
                    log(ERROR, "Runtime API at %s silent for %.0f s: giving up", address, lost_after)
                    break
                log(INFO, "Runtime API at %s not answering (%s)", address, type(ex).__name__)
                time.sleep(max(poll, 1.0))
                continue
            if res.HasField("task") and res.token:
                app.run_task(address, res.token)
            else:
                time.sleep(poll)
    finally:
        client.close()
    return app.tasks


class SuperNodeClock:
    """``time`` for Flower 1.42's SuperNode loop (``start_client_internal``), with its two kinds of
    sleep shortened:

    - ``sleep(3)`` after a poll of the SuperLink found no message: at most ``idle_poll`` seconds
      (a request to the SuperLink per poll);
    - ``sleep(0.5)`` while it waits for the ClientApp's reply, or for an object of it, in the
      node's own in-memory state: at most ``local_wait`` seconds (no request; a train task of the
      default workload takes 0.3–0.4 s, so a 0.5 s step made every message wait for the next one).
    """

    IDLE_SLEEP = 3.0  # Flower's pause after an empty poll; shorter pauses are its local waits

    def __init__(self, idle_poll: float, local_wait: float = 0.02) -> None:
        self.idle_poll, self.local_wait = idle_poll, local_wait

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.idle_poll if seconds >= self.IDLE_SLEEP else self.local_wait))


DEFAULT_IDLE_POLL = 0.25  # seconds between a SuperNode's polls while it has no message (Flower's: 3)


def idle_poll_seconds(environ: dict[str, str] | None = None) -> float:
    """``SPLITMIX_SUPERNODE_POLL`` in seconds (default :data:`DEFAULT_IDLE_POLL`); a value that is
    not a number in [0.05, 60] stops the node with one line naming the variable."""
    raw = (os.environ if environ is None else environ).get("SPLITMIX_SUPERNODE_POLL", str(DEFAULT_IDLE_POLL))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.05 <= value <= 60:
        raise SystemExit(f"SPLITMIX_SUPERNODE_POLL = {raw!r}: allowed: seconds between 0.05 and 60 (default {DEFAULT_IDLE_POLL})")
    return value


def run_supernode(argv: list[str], idle_poll: float) -> None:
    """``flower-supernode ARGV`` with its idle poll of the SuperLink at most every ``idle_poll`` s.

    Flower 1.42's SuperNode sleeps 3 s whenever a poll finds no message
    (``start_client_internal``: ``time.sleep(3)``), so a message waits 1.5 s on average before
    the node sees it, twice a round (train, evaluation): with the default workload that alone made
    a deployed round ~4× the simulated one. ``SPLITMIX_SUPERNODE_POLL`` (:func:`idle_poll_seconds`,
    default :data:`DEFAULT_IDLE_POLL`) shortens it, at the cost of more requests to the SuperLink
    (four a second per idle node at 0.25 s; raise it for thousands of nodes). Its waits on its own
    state (0.5 s steps in Flower) become 20 ms steps (:class:`SuperNodeClock`)."""
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    loop.time = SuperNodeClock(idle_poll)  # type: ignore[assignment]
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def supervise(supernode_argv: list[str], address: str = DEFAULT_RUNTIME_API) -> int:
    """Run ``flower-supernode --isolation process`` + ``serve``; end both when either ends.

    The SuperNode child gets SIGTERM when this process is told to stop, and (Linux) SIGKILL if
    this process dies without cleaning up, so no orphan keeps the node id registered."""
    import ctypes

    def _die_with_parent() -> None:  # prctl(PR_SET_PDEATHSIG, SIGKILL)
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    idle_poll = idle_poll_seconds()
    command = [sys.executable, "-m", "deploy.warm_clientapp", "--idle-poll", str(idle_poll), *supernode_argv, "--isolation", "process"]
    child = subprocess.Popen(command, preexec_fn=_die_with_parent)
    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        serve(address, alive=lambda: child.poll() is None and not stopping.is_set())
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 0 if stopping.is_set() else (child.returncode or 1)  # the node ended or hung: restart the pair


if __name__ == "__main__":  # the SuperNode child of ``supervise``
    _, flag, poll, *rest = sys.argv
    assert flag == "--idle-poll", sys.argv
    run_supernode(rest, float(poll))
