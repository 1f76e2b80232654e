"""The companion GPU kernel of a notebook kernel: started through the gateway on first use,
reached over its websocket, and running `%%gpu` cells through the agent installed in it."""

from __future__ import annotations

import json
import os
import queue
import sys
import time
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from . import agent
from .channel import CLOSED, KernelChannel
from .errors import (
    GpuKernelLost,
    GpuMagicError,
    GpuTimeout,
    GpuTransferError,
    GpuVersionMismatch,
    RemoteError,
    with_remote_traceback,
)
from .gateway_api import GatewayApi
from .namespace import Payload, RemoteValue, SentValues, human_bytes
from .shapes import Shape

# Makes the agent report other versions than its own: how tests stand in for a GPU kernel
# built from another image (a JSON object, e.g. {"python": "3.9.18"}).
REPORTED_VERSIONS_ENV = "GPUPOOL_TEST_AGENT_VERSIONS"
# The MIME type of a `%%gpu` cell's progress line and footer (with a text/plain line beside it),
# which the Lab front end renders as the cell's footer.
RUN_MIME = "application/vnd.gpupool.run+json"
INTERRUPT_GRACE_S = 10.0  # how long an interrupted cell may take to stop on the GPU kernel
RESUME_CHECK_S = 1.0  # with no answer this long, look whether the kernel is resuming


@dataclass
class Cell:
    """One `%%gpu` cell, as the magic parsed it."""

    code: str
    count: int | None
    reads: set[str]
    forced: set[str]
    pull: list[str]
    max_bytes: int
    timeout: float | None = None
    writes: set[str] = field(default_factory=set)  # names the cell binds


@dataclass
class Outcome:
    """What came back from a cell, after the pulled variables were set."""

    pulled: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sent_bytes: dict[str, int] = field(default_factory=dict)  # name -> pickled size
    received_bytes: dict[str, int] = field(default_factory=dict)


class Progress:
    """One line of text in the cell's output, updated in place; with `data`, also as RUN_MIME
    for the Lab's cell footer."""

    def __init__(self) -> None:
        self.handle: Any = None

    def show(self, text: str, data: dict[str, Any] | None = None) -> None:
        from IPython.display import display

        bundle: dict[str, Any] = {"text/plain": text}
        if data is not None:
            bundle[RUN_MIME] = data
        if self.handle is None:
            self.handle = display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)


class CellOutput:
    """The GPU kernel's IOPub output for a cell, replayed into this kernel's current cell."""

    def forward(self, msg: dict[str, Any]) -> None:
        from IPython.display import clear_output, publish_display_data

        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
            stream.write(content.get("text", ""))
            stream.flush()
        elif kind in ("display_data", "update_display_data", "execute_result"):
            publish_display_data(
                content.get("data", {}),
                content.get("metadata") or {},
                transient=content.get("transient") or None,
                update=kind == "update_display_data",
            )
        elif kind == "clear_output":
            clear_output(wait=bool(content.get("wait")))
        elif kind == "error":
            sys.stderr.write("\n".join(content.get("traceback", [])) + "\n")


class AgentMissing(Exception):
    """The GPU kernel went idle without the agent seeing the cell (a new process: resumed)."""


class Companion:
    """One GPU kernel at the gateway that runs this notebook kernel's `%%gpu` cells."""

    def __init__(self, api: GatewayApi, shape: Shape, env: dict[str, str] | None = None) -> None:
        self.api = api
        self.shape = shape
        self.env = env or {}
        self.kernel_id: str | None = None
        self.channel: KernelChannel | None = None
        self.comm_id = ""
        self.remote: dict[str, Any] = {}
        self.sent = SentValues()
        self.remote_packages: dict[str, str | None] = {}
        self.warned: set[str] = set()
        self.compatible = False  # the agent is installed and its versions match this side's
        self.timed_out = False
        self.last: Outcome | None = None  # of the last cell, also when it raised
        # The gateway's clock less this machine's, and the time of its last usage report.
        self.clock_offset: float | None = None
        self.last_until: str | None = None

    # --- life -----------------------------------------------------------------------------

    def start(self, progress: Progress, deadline: float | None = None) -> None:
        began = time.monotonic()
        model = self.api.start_kernel(self.shape.kernel_name, self.env)
        self.kernel_id = str(model["id"])
        try:
            self.wait_running(model, progress, began, deadline)
        except BaseException:
            self.release()
            raise
        elapsed = time.monotonic() - began
        progress.show(
            f"{self.shape} GPU kernel {self.kernel_id[:8]} ready in {elapsed:.1f} s",
            self.waiting_data("ready", None, elapsed),
        )

    def wait_running(
        self,
        model: dict[str, Any] | None,
        progress: Progress,
        began: float,
        deadline: float | None = None,
    ) -> None:
        assert self.kernel_id is not None
        while True:
            if model is None:
                raise GpuKernelLost(f"the {self.shape} GPU kernel is gone; run the cell again")
            info = model.get("gpupool") or {}
            state = info.get("state") or (
                "starting" if model.get("execution_state") == "starting" else "running"
            )
            if state == "running":
                return
            if state == "dead":
                raise GpuKernelLost(
                    f"the {self.shape} GPU kernel ended before it ran: "
                    f"{info.get('reason') or 'no reason given'}"
                )
            elapsed = time.monotonic() - began
            progress.show(
                self.waiting_text(info, state, elapsed),
                self.waiting_data(state, info.get("queue_position"), elapsed),
            )
            if deadline is not None and time.monotonic() > deadline:
                raise GpuTimeout(f"no {self.shape} GPU kernel was running within --timeout")
            time.sleep(0.2)
            model = self.api.kernel(self.kernel_id)

    def waiting_text(self, info: dict[str, Any], state: str, elapsed: float) -> str:
        gpu_type = info.get("gpu_type") or self.shape.gpu_type
        if state == "queued":
            return f"queued for {gpu_type}, position {info.get('queue_position', '?')}"
        if state == "suspended":
            return f"{gpu_type} kernel suspended while idle; resuming… {elapsed:.1f} s"
        if state == "resuming":
            return f"resuming {gpu_type} kernel… {elapsed:.1f} s"
        return f"starting {gpu_type} kernel… {elapsed:.1f} s"

    def waiting_data(self, state: str, position: Any, elapsed: float) -> dict[str, Any]:
        return {
            "state": state,
            "kernel_id": self.kernel_id,
            "gpu_type": self.shape.gpu_type,
            "gpu_count": self.shape.gpu_count,
            "queue_position": position if isinstance(position, int) else None,
            "elapsed_seconds": round(elapsed, 1),
        }

    def connect(self) -> None:
        """Open the websocket and install the agent."""
        assert self.kernel_id is not None
        if self.channel is not None:
            self.channel.close()
        self.channel = KernelChannel(self.api.url, self.api.token, self.kernel_id)
        try:
            self.channel.connect()
        except OSError as error:  # ConnectionError included: refused, unreachable, TLS
            self.channel = None
            raise GpuKernelLost(
                f"could not open the {self.shape} GPU kernel's websocket at {self.api.url}: {error}"
            ) from None
        self.install()

    def install(self) -> None:
        """Install the agent, open its comm, and check the two sides can read each other."""
        channel = self._channel()
        overrides = json.loads(os.environ.get(REPORTED_VERSIONS_ENV) or "{}")
        content = {
            "code": agent.install_code(overrides),
            "silent": True,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        msg_id, waiting = self._send(channel, "shell", "execute_request", content)
        try:
            reply = self._expect(waiting, lambda m: m["msg_type"] == "execute_reply", 60)
        finally:
            channel.forget(msg_id)
        if reply["content"].get("status") != "ok":
            c = reply["content"]
            raise GpuMagicError(
                f"could not install the %%gpu agent in the GPU kernel: "
                f"{c.get('ename')}: {c.get('evalue')}"
            )
        comm_id = uuid.uuid4().hex
        open_content = {"comm_id": comm_id, "target_name": agent.TARGET, "data": {}}
        msg_id, waiting = self._send(channel, "shell", "comm_open", open_content)
        try:
            hello = self._expect(waiting, lambda m: m["msg_type"] == "comm_msg", 30)
        finally:
            channel.forget(msg_id)
        self.comm_id = comm_id
        self.remote = dict(hello["content"]["data"])
        self.sent.forget()
        self.remote_packages.clear()
        self.compatible = False
        self.check_versions()
        self.compatible = True

    def check_versions(self) -> None:
        here, there = agent.versions(), self.remote
        py_here, py_there = _minor(here["python"]), _minor(str(there.get("python", "?")))
        cp_here, cp_there = here["cloudpickle"], there.get("cloudpickle")
        if py_here == py_there and cp_here == cp_there:
            return
        if cp_there is None:
            problem = "cloudpickle is not installed in the GPU kernel"
            fix = f"install cloudpickle=={cp_here} there"
        else:
            problem = (
                f"this kernel has Python {here['python']} and cloudpickle {cp_here}; the "
                f"{self.shape} GPU kernel has Python {there.get('python')} and cloudpickle "
                f"{cp_there}"
            )
            fix = (
                f"use a GPU kernel image with Python {py_here} and cloudpickle {cp_here}, or "
                f"run this notebook on a Python {py_there} kernel with cloudpickle {cp_there}"
            )
        raise GpuVersionMismatch(
            f"{problem}. Functions and classes defined in a notebook travel as Python bytecode "
            "inside cloudpickle's format, which loads only on the same Python minor version and "
            f"cloudpickle version, so nothing was sent. To fix it, {fix}."
        )

    def release(self) -> None:
        """Shut the GPU kernel down (its GPU and its bill stop now)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        kernel_id, self.kernel_id = self.kernel_id, None
        if kernel_id is not None:
            self.api.shutdown(kernel_id)

    def model(self) -> dict[str, Any] | None:
        return self.api.kernel(self.kernel_id) if self.kernel_id else None

    # --- cells ----------------------------------------------------------------------------

    def run_cell(self, cell: Cell, ns: MutableMapping[str, Any], output: CellOutput) -> Outcome:
        """Send what the cell reads, run it, set what it assigns; raise what it raised."""
        deadline = time.monotonic() + cell.timeout if cell.timeout else None
        for attempt in range(2):
            if self.channel is None or not self.channel.open or not self.compatible:
                self.connect()
            self.check_stand_ins(ns, (cell.reads | cell.forced) - cell.writes)
            payload = self.sent.payload(
                ns, cell.reads | cell.forced, cell.forced, limit=cell.max_bytes
            )
            self.check_payload(payload, cell)
            try:
                reply, received = self.exchange(cell, payload, output, deadline)
            except AgentMissing:
                if attempt:
                    raise GpuKernelLost(
                        "the GPU kernel did not answer the cell twice; `%gpu release` and run "
                        "the cell again to start a new one"
                    ) from None
                self.install()  # a new process behind the same kernel id (resumed): again
                continue
            return self.finish(cell, payload, reply, received, ns, deadline)
        raise AssertionError("unreachable")

    def stand_in(self, ns: MutableMapping[str, Any], name: str, why: str) -> None:
        """`name` stays on the GPU kernel: a stand-in here, and this side no longer knows what
        the kernel holds for it (so a value assigned here later is always sent)."""
        ns[name] = RemoteValue(name, self.kernel_id, why)
        self.sent.digests.pop(name, None)

    def check_stand_ins(self, ns: MutableMapping[str, Any], names: set[str]) -> None:
        """A stand-in is only good on the GPU kernel that holds its value."""
        stale = sorted(
            name for name in names
            if isinstance(ns.get(name), RemoteValue) and ns[name].kernel_id != self.kernel_id
        )  # fmt: skip
        if stale:
            raise GpuTransferError(
                f"{', '.join(stale)} stayed on a GPU kernel that has ended since; run the cell "
                "that made it again (nothing was sent)"
            )

    def check_payload(self, payload: Payload, cell: Cell) -> None:
        forced_skipped = {n: why for n, why in payload.skipped.items() if n in cell.forced}
        if forced_skipped:
            name, why = next(iter(forced_skipped.items()))
            raise GpuTransferError(f"--push {name}: it cannot be pickled ({why})")
        for name, why in payload.skipped.items():
            if name not in self.warned:
                self.warned.add(name)
                note = f"not sent to the GPU kernel: {name} (cannot be pickled: {why})"
                print(note, file=sys.stderr)
        if payload.total > cell.max_bytes:
            largest = sorted(payload.sizes.items(), key=lambda kv: -kv[1])[:3]
            named = ", ".join(f"{n} ({human_bytes(s)})" for n, s in largest)
            raise GpuTransferError(
                f"this cell would send {human_bytes(payload.total)} to the GPU kernel, over "
                f"--max-bytes {human_bytes(cell.max_bytes)}; the largest: {named}. Nothing was "
                "sent. Send less (load the data in a %%gpu cell instead), or raise the limit "
                "with --max-bytes."
            )
        self.check_packages(payload)

    def check_packages(self, payload: Payload) -> None:
        unknown = sorted(payload.packages - set(self.remote_packages))
        if unknown:
            self.remote_packages.update(self.ask({"op": "versions", "modules": unknown}))
        here = agent.package_versions(sorted(payload.packages))
        missing = sorted(p for p in payload.packages if self.remote_packages.get(p) is None)
        if missing:
            users = sorted(n for n, needs in payload.needs.items() if needs & set(missing))
            one = len(missing) == 1
            verb = "needs" if len(users) == 1 else "need"
            raise GpuTransferError(
                f"{', '.join(missing)} {'is' if one else 'are'} not installed in the GPU kernel, "
                f"and this cell sends {', '.join(users)}, which {verb} {'it' if one else 'them'}. "
                f"Nothing was sent. Install {'it' if one else 'them'} "
                f"there (a %%gpu cell with `%pip install {' '.join(missing)}`), then run this "
                "cell again."
            )
        for package in sorted(payload.packages):
            there, mine = self.remote_packages.get(package), here.get(package)
            if mine and there and mine != there and package not in self.warned:
                self.warned.add(package)
                print(
                    f"note: {package} is {mine} here and {there} in the GPU kernel; if a "
                    "variable fails to load there, match the versions",
                    file=sys.stderr,
                )

    def ask(self, data: dict[str, Any]) -> dict[str, Any]:
        """A question to the agent that is answered with one comm message."""
        channel = self._channel()
        content = {"comm_id": self.comm_id, "data": data}
        msg_id, waiting = self._send(channel, "shell", "comm_msg", content)
        try:
            answer = self._expect(waiting, lambda m: m["msg_type"] == "comm_msg", 30)
        finally:
            channel.forget(msg_id)
        return dict(answer["content"]["data"].get("versions") or {})

    def exchange(
        self, cell: Cell, payload: Payload, output: CellOutput, deadline: float | None
    ) -> tuple[dict[str, Any], agent.Assembler]:
        channel = self._channel()
        run_id = uuid.uuid4().hex
        layout, messages = agent.split(payload.items)
        shape = {"layout": layout, "sizes": agent.sizes(payload.items)}
        for buffers in messages[:-1]:
            part = {"comm_id": self.comm_id, "data": {"op": "part", "id": run_id, **shape}}
            self._send(channel, "shell", "comm_msg", part, buffers, listen=False)
        data = {"op": "run", "id": run_id, "code": cell.code, "count": cell.count,
                "names": payload.names, **shape, "pull": cell.pull,
                "max_bytes": cell.max_bytes}  # fmt: skip
        msg_id, waiting = self._send(
            channel, "shell", "comm_msg", {"comm_id": self.comm_id, "data": data}, messages[-1]
        )
        assert waiting is not None
        try:
            return self.wait_done(waiting, output, deadline)
        finally:
            channel.forget(msg_id)

    def wait_done(
        self, waiting: queue.Queue[dict[str, Any]], output: CellOutput, deadline: float | None
    ) -> tuple[dict[str, Any], agent.Assembler]:
        """Forward the cell's output until the agent says it is done; Ctrl-C (and --timeout)
        interrupt the GPU kernel and wait for the cell to stop there. The variables coming back
        are put together (and hashed) as their pieces arrive."""
        assert self.kernel_id is not None
        started = False
        held: list[dict[str, Any]] = []  # output before the agent took the cell is the kernel's
        received: agent.Assembler | None = None
        interrupted: float | None = None
        last = time.monotonic()
        progress: Progress | None = None
        self.timed_out = False
        while True:
            try:
                try:
                    msg = waiting.get(timeout=0.25)
                except queue.Empty:
                    now = time.monotonic()
                    if interrupted is not None and now - interrupted > INTERRUPT_GRACE_S:
                        raise GpuKernelLost(
                            f"the GPU kernel did not stop the cell within {INTERRUPT_GRACE_S:.0f}"
                            " s of the interrupt and may still be busy; `%gpu release` ends it"
                        ) from None
                    if deadline is not None and now > deadline and interrupted is None:
                        self.timed_out = True
                        interrupted = now
                        self.api.interrupt(self.kernel_id)
                    if not started and now - last > RESUME_CHECK_S:
                        last = now
                        progress = self.show_resume(progress)
                    continue
                if msg is CLOSED:
                    raise GpuKernelLost(self._lost_reason())
                kind = msg["msg_type"]
                if kind == "comm_msg":
                    data = msg["content"].get("data") or {}
                    if not started and data.get("op") in ("started", "part", "done"):
                        started = True  # a quick cell has no `started`: its answer says it
                        for early in held:
                            output.forward(early)
                        held.clear()
                    if data.get("op") in ("part", "done"):
                        if received is None:
                            received = agent.Assembler(
                                data.get("layout") or [], data.get("sizes") or [], hashed=True
                            )
                        received.add(msg["buffers"])
                        if data["op"] == "done":
                            return data, received
                elif kind == "status":
                    if msg["content"].get("execution_state") == "idle":
                        if not started:
                            raise AgentMissing()
                        raise GpuKernelLost("the %%gpu agent stopped without answering the cell")
                elif started:
                    output.forward(msg)
                else:
                    held.append(msg)  # e.g. "No such comm" from a kernel that was resumed
            except KeyboardInterrupt:
                if interrupted is not None:
                    raise  # a second Ctrl-C: stop waiting
                interrupted = time.monotonic()
                self.api.interrupt(self.kernel_id)

    def show_resume(self, progress: Progress | None) -> Progress | None:
        """A kernel suspended while idle resumes on this cell: show it waiting for a GPU."""
        model = self.model()
        if model is None:
            raise GpuKernelLost(self._lost_reason())
        state = (model.get("gpupool") or {}).get("state", "running")
        if state == "dead":
            raise GpuKernelLost(self._lost_reason(model))
        if state != "running":
            progress = progress or Progress()
            self.wait_running(model, progress, time.monotonic())
            progress.show(f"{self.shape} GPU kernel resumed", self.waiting_data("ready", None, 0))
        return progress

    def finish(
        self,
        cell: Cell,
        payload: Payload,
        reply: dict[str, Any],
        received: agent.Assembler,
        ns: MutableMapping[str, Any],
        deadline: float | None,
    ) -> Outcome:
        load_errors = reply.get("load_errors") or {}
        if load_errors:
            named = "; ".join(f"{n} ({why})" for n, why in load_errors.items())
            raise GpuTransferError(
                f"the GPU kernel could not load {named}. The cell did not run there."
            )
        self.sent.sent(payload)
        outcome = Outcome(sent=list(payload.names), sent_bytes=dict(payload.sizes))
        self.last = outcome
        try:
            items = received.finish()
        except ValueError as error:
            raise GpuTransferError(
                f"what came back from the GPU kernel is damaged: {error}"
            ) from None
        digests = received.digests()
        for index, (name, blobs) in enumerate(zip(reply.get("names") or [], items, strict=False)):
            try:
                value = agent.load(blobs)
            except Exception as error:
                why = f"here {agent.describe(error)}"
                self.stand_in(ns, name, why)
                outcome.notes.append(f"{name} stays on the GPU kernel: {why}")
                continue
            ns[name] = value
            self.sent.remember(name, value, digests[index])
            outcome.pulled.append(name)
            outcome.received_bytes[name] = sum(len(blob) for blob in blobs)
        for name, size in (reply.get("kept") or {}).items():
            why = f"{human_bytes(size)} is over --max-bytes {human_bytes(cell.max_bytes)}"
            self.stand_in(ns, name, why)
            outcome.notes.append(
                f"{name} stays on the GPU kernel: {why}; fetch it with {name}.fetch() or "
                f"`%gpu pull {name}`"
            )
        for name, why in (reply.get("failed") or {}).items():
            self.stand_in(ns, name, f"it cannot be pickled ({why})")
            outcome.notes.append(f"{name} stays on the GPU kernel: it cannot be pickled ({why})")
        for note in outcome.notes:
            print(note, file=sys.stderr)
        failure = reply.get("error")
        if not failure:
            # A name the cell bound but --pull/--no-pull left there keeps its value here, and a
            # later cell that reads it uses the GPU kernel's (a model trained there is not
            # overwritten by the untrained one still here) unless it is assigned here again.
            for name in sorted(cell.writes - set(cell.pull) - set(outcome.pulled)):
                if name in ns and not isinstance(ns[name], RemoteValue):
                    self.sent.remember(name, ns[name])
        if failure:
            raise self.remote_exception(failure, items, cell)
        return outcome

    def remote_exception(
        self, error: dict[str, Any], items: list[list[bytearray]], cell: Cell
    ) -> BaseException:
        if self.timed_out:
            return GpuTimeout(
                f"the cell ran over --timeout {cell.timeout:g} s on the GPU kernel and was "
                "interrupted there"
            )
        lines = list(error.get("traceback") or [])
        exc: BaseException | None = None
        if error.get("item") is not None:
            try:
                loaded = agent.load(items[error["item"]])
                exc = loaded if isinstance(loaded, BaseException) else None
            except Exception:
                exc = None
        if exc is None:
            exc = RemoteError(str(error.get("type")), str(error.get("message")), lines)
        return with_remote_traceback(exc, lines)

    # --- helpers --------------------------------------------------------------------------

    def _send(self, channel: KernelChannel, *args: Any, **kwargs: Any) -> Any:
        """`channel.send`; a connection that broke under it is the GPU kernel lost, said so."""
        try:
            return channel.send(*args, **kwargs)
        except ConnectionError:
            raise GpuKernelLost(self._lost_reason()) from None

    def _channel(self) -> KernelChannel:
        if self.channel is None:
            raise GpuKernelLost("not connected to the GPU kernel")
        return self.channel

    def _expect(self, waiting: Any, match: Any, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise GpuKernelLost(f"the GPU kernel did not answer within {timeout:.0f} s")
            try:
                msg = waiting.get(timeout=min(left, 0.25))
            except queue.Empty:
                continue
            if msg is CLOSED:
                raise GpuKernelLost(self._lost_reason())
            if match(msg):
                return dict(msg)

    def _lost_reason(self, model: dict[str, Any] | None = None) -> str:
        """Why the cell lost its GPU kernel, after forgetting what is no longer there."""
        closed = self.channel.closed_reason if self.channel else ""
        if self.channel is not None:
            self.channel.close()
            self.channel = None  # the next cell reconnects
        try:
            model = model or self.model()
        except GpuMagicError as error:
            return f"{closed or 'the GPU kernel stopped answering'}; {error}"
        info = (model or {}).get("gpupool") or {}
        if model is None or info.get("state") == "dead":
            self.kernel_id = None
            return (
                f"the {self.shape} GPU kernel ended ({info.get('reason') or 'it is gone'}); its "
                "variables are lost. The next %%gpu cell starts a new one."
            )
        return f"{closed or 'the connection to the GPU kernel broke'}; run the cell again"


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])
