"""`%%gpu` and `%gpu`: run one cell on a pooled GPU, with the notebook's variables going in and
out. Registered by `%load_ext jupyter_ext`."""

from __future__ import annotations

import atexit
import sys
import time
from datetime import datetime, timezone
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Int, Unicode

from .companion import RUN_MIME, Cell, CellOutput, Companion, Outcome, Progress, Shape
from .errors import GatewayError, GpuMagicError
from .gateway_api import GatewayApi
from .namespace import cell_names, human_bytes, parse_names, parse_size, sendable

COMMANDS = ("status", "release", "usage", "pull")


@magics_class
class GpuMagics(Magics):
    """The companion GPU kernel of this kernel, and the magics that use it."""

    gateway_url = Unicode(
        "", help="The gpupool gateway's URL; empty: the GPUPOOL_URL environment variable."
    ).tag(config=True)
    token = Unicode(
        "", help="A tenant token for the gateway; empty: the GPUPOOL_TOKEN environment variable."
    ).tag(config=True)
    gpu_type = Unicode("H100", help="GPU type of the companion kernel when -t is not given.").tag(
        config=True
    )
    gpu_count = Int(1, help="GPUs of the companion kernel when -n is not given.").tag(config=True)
    idle_timeout = Int(
        0,
        help="Seconds the companion kernel may idle before the gateway suspends it (sent as "
        "KERNEL_IDLE_TIMEOUT); 0: the gateway's default.",
    ).tag(config=True)
    max_bytes = Unicode(
        "256MB",
        help="Largest total a %%gpu cell sends, and largest variable it brings back "
        "(larger ones stay on the GPU kernel); --max-bytes overrides it per cell.",
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.companion: Companion | None = None
        atexit.register(self.shutdown)

    # --- %%gpu ----------------------------------------------------------------------------

    @magic_arguments()
    @argument("-t", "--type", default=None, help="GPU type, e.g. H100 or A10G.")
    @argument("-n", "--count", type=int, default=None, help="Number of GPUs.")
    @argument("--push", default="", help="Also send these names (a,b), changed or not.")
    @argument("--pull", default=None, help="Bring back these names (x,y) instead of those the "
              "cell assigns.")  # fmt: skip
    @argument("--no-pull", action="store_true", help="Bring nothing back.")
    @argument("--timeout", type=float, default=None, help="Interrupt the cell after S seconds.")
    @argument("--fresh", action="store_true", help="Start a new GPU kernel for this cell.")
    @argument("--max-bytes", default=None, help="Size limit, e.g. 256MB (see GpuMagics.max_bytes).")
    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> None:
        """Run this cell on a companion GPU kernel from the gpupool gateway.

        The first `%%gpu` cell starts the GPU kernel; later cells reuse it, so what they load
        stays on the GPU. Variables the cell reads that exist here are sent (only when they
        changed); variables it assigns come back, GPU tensors and arrays as CPU copies. Output
        streams into the cell as it happens; an exception is raised here with the GPU kernel's
        traceback; interrupting this kernel interrupts the cell there.

        Line commands:
          %gpu status     the GPU kernel's shape, state, cost so far and idle deadline
          %gpu release    shut the GPU kernel down now (it also ends with this kernel)
          %gpu usage      this tenant's GPU usage and cost from the gateway
          %gpu pull x y   bring back variables left on the GPU kernel
        """
        if cell is None:
            self.command(line)
            return
        args = parse_argstring(self.gpu, line)
        try:
            max_bytes = parse_size(args.max_bytes or self.max_bytes)
            forced = set(parse_names(args.push))
            pull = parse_names(args.pull) if args.pull is not None else None
        except ValueError as error:
            raise UsageError(str(error)) from None
        if args.count is not None and args.count < 1:
            raise UsageError(f"-n {args.count}: a GPU kernel has at least one GPU")
        shape = Shape(args.type or self.gpu_type, args.count or self.gpu_count)
        shell = self.shell
        assert shell is not None
        names = cell_names(shell.transform_cell(cell))
        local = sendable(shell.user_ns, shell.user_ns_hidden)
        missing = sorted(forced - set(shell.user_ns))
        if missing:
            raise UsageError(f"--push {missing[0]}: there is no variable {missing[0]} here")
        # A comment in place of the magic's line keeps the line numbers the cell's own; a cell
        # magic inside (`%%time`) must stay first, at the cost of one line.
        code = cell if cell.lstrip().startswith("%%") else f"# %%gpu {line}\n{cell}"
        todo = Cell(
            code=code,
            count=cell_number(shell),
            reads=names.reads & local,
            forced=forced,
            pull=[] if args.no_pull else (pull if pull is not None else sorted(names.writes)),
            max_bytes=max_bytes,
            timeout=args.timeout,
            writes=names.writes,
        )
        began = time.monotonic()
        deadline = began + args.timeout if args.timeout else None
        before = self.companion
        companion = self.ensure(shape, fresh=args.fresh, deadline=deadline)
        # What this run is billed: the gateway's ledger for this kernel from the gateway's "now"
        # before the cell (all of it, for a kernel started by this cell) to its "now" after.
        since = None if companion is not before else gateway_now(companion)
        companion.last = None
        try:
            companion.run_cell(todo, shell.user_ns, CellOutput())
        finally:
            show_footer(companion, since, time.monotonic() - began, companion.last)

    def ensure(self, shape: Shape, fresh: bool = False, deadline: float | None = None) -> Companion:
        """The companion kernel of this shape, started if there is none."""
        current = self.companion
        api = GatewayApi.from_env(self.gateway_url, self.token)
        if current is not None and current.kernel_id is not None and current.shape != shape:
            # Asked first: a shape the pool does not have must not cost the kernel its variables.
            try:
                api.kernelspec(shape.kernel_name)
            except GatewayError as error:
                if error.status != 404:
                    raise
                raise GatewayError(
                    404, f"{error} The {current.shape} GPU kernel is kept, with its "
                    "variables.",
                ) from None  # fmt: skip
        if (
            current is not None
            and current.kernel_id is not None
            and (fresh or current.shape != shape)
        ):
            if not fresh:
                note = f"this cell asks for {shape}: shutting down the {current.shape} GPU kernel"
                print(f"{note} (its variables are lost) and starting one", file=sys.stderr)
            current.release()
        if self.companion is None or self.companion.kernel_id is None or fresh:
            self.companion = None
            env = {"KERNEL_IDLE_TIMEOUT": str(self.idle_timeout)} if self.idle_timeout else {}
            companion = Companion(api, shape, env)
            companion.start(Progress(), deadline)
            self.companion = companion
        return self.companion

    # --- %gpu ---------------------------------------------------------------------------------

    def command(self, line: str) -> None:
        words = line.split()
        if not words or words[0] not in COMMANDS:
            usage = f"use %gpu {'|'.join(COMMANDS)}, or %%gpu on a cell to run it on a GPU"
            raise UsageError(f"%gpu {line.strip()}: {usage}")
        action, rest = words[0], words[1:]
        if action == "status":
            print(self.status())
        elif action == "release":
            print(self.release())
        elif action == "usage":
            print(self.usage())
        elif action == "pull":
            self.pull(parse_names(" ".join(rest)))

    def status(self) -> str:
        companion = self.companion
        if companion is None or companion.kernel_id is None:
            return (f"no GPU kernel yet: the next %%gpu cell starts one "
                    f"({Shape(self.gpu_type, self.gpu_count)})")  # fmt: skip
        model = companion.model()
        if model is None:
            companion.kernel_id = None
            return "the GPU kernel is gone; the next %%gpu cell starts a new one"
        info = model.get("gpupool") or {}
        shape = Shape(
            info.get("gpu_type", companion.shape.gpu_type),
            info.get("gpu_count", companion.shape.gpu_count),
        )
        state = info.get("state", "?")
        if state == "running":
            state += f" ({model.get('execution_state', '?')})"
        lines = [
            f"GPU kernel {model['id']} · {shape} · {state}",
            f"billed {info.get('billed_seconds', 0):g} s · ${info.get('cost_usd', 0):.4f} so far",
        ]
        if info.get("queue_position"):
            lines.append(f"queue position {info['queue_position']}")
        deadline = info.get("idle_deadline")
        if deadline:
            lines.append(f"suspends if idle until {deadline} ({_until(deadline)})")
        if info.get("reason"):
            lines.append(f"reason: {info['reason']}")
        remote = companion.remote
        if remote:
            lines.append(f"Python {remote.get('python')} · cloudpickle {remote.get('cloudpickle')}")
        return "\n".join(lines)

    def release(self) -> str:
        companion = self.companion
        if companion is None or companion.kernel_id is None:
            return "no GPU kernel to release"
        kernel_id = companion.kernel_id
        try:
            model = companion.model() or {}
        except GpuMagicError:
            model = {}
        companion.release()
        self.companion = None
        info = model.get("gpupool") or {}
        cost = ""
        if info:
            cost = f" (billed {info.get('billed_seconds', 0):g} s, ${info.get('cost_usd', 0):.4f})"
        return f"shut down the {companion.shape} GPU kernel {kernel_id[:8]}{cost}"

    def usage(self) -> str:
        api = GatewayApi.from_env(self.gateway_url, self.token)
        try:
            report = api.usage()
        except GatewayError as error:
            if error.status in (404, 405):
                return f"the gateway at {api.url} has no usage report (/api/usage)"
            raise
        total = report.get("total") or {}
        lines = [
            f"tenant {report.get('tenant', '?')}: {total.get('gpu_seconds', 0):g} GPU-seconds, "
            f"${total.get('cost_usd', 0):.4f} in {total.get('intervals', 0)} intervals"
        ]
        for gpu_type, row in (report.get("totals") or {}).items():
            lines.append(
                f"  {gpu_type}: {row.get('gpu_seconds', 0):g} GPU-seconds, "
                f"${row.get('cost_usd', 0):.4f}"
            )
        companion = self.companion
        if companion is not None and companion.kernel_id is not None:
            mine = [
                i
                for i in report.get("intervals") or []
                if i.get("kernel_id") == companion.kernel_id
            ]
            lines.append(
                f"this notebook's GPU kernel: {sum(i.get('gpu_seconds', 0) for i in mine):g} "
                f"GPU-seconds, ${sum(i.get('cost_usd', 0) for i in mine):.4f}"
            )
        budget = report.get("budget")
        if isinstance(budget, dict) and "spent_this_month_usd" in budget:
            spent = f"${budget['spent_this_month_usd']:.4f} spent in {budget.get('month', '?')}"
            limit = budget.get("budget_usd")
            lines.append(f"{spent} of a ${limit:.2f} budget" if limit else f"{spent}; no budget")
        return "\n".join(lines)

    def pull(self, names: list[str]) -> None:
        """Fetch variables left on the GPU kernel, whatever their size."""
        if not names:
            raise UsageError("%gpu pull NAME [NAME…]: which variables to bring back")
        companion = self.companion
        if companion is None or companion.kernel_id is None:
            raise UsageError("there is no GPU kernel to pull from; run a %%gpu cell first")
        shell = self.shell
        assert shell is not None
        todo = Cell(code="", count=None, reads=set(), forced=set(), pull=names, max_bytes=1 << 62)
        outcome = companion.run_cell(todo, shell.user_ns, CellOutput())
        absent = [n for n in names if n not in outcome.pulled]
        if absent:
            print(f"not on the GPU kernel: {', '.join(absent)}", file=sys.stderr)
        else:
            print(f"pulled {', '.join(names)}")

    # --- end ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """This kernel is ending: so does its GPU kernel, and with it the bill."""
        companion, self.companion = self.companion, None
        if companion is not None and companion.kernel_id is not None:
            try:
                companion.release()
            except Exception as error:  # at exit, say it and go on
                print(f"could not shut down the GPU kernel {companion.kernel_id}: {error}",
                      file=sys.stderr)  # fmt: skip


def gateway_now(companion: Companion) -> str | None:
    """The gateway's clock now, as its usage report gives it ("" when it cannot be read)."""
    if companion.kernel_id is None:
        return ""
    try:
        return str(companion.api.usage(companion.kernel_id)["now"])
    except (GpuMagicError, KeyError, TypeError):
        return ""


def run_footer(
    companion: Companion, since: str | None, wall: float, outcome: Outcome | None
) -> dict[str, Any]:
    """What a `%%gpu` cell's footer shows: where it ran, how long, what the gateway billed for
    it (its ledger for this kernel from `since`, None: from the kernel's start, to now), what
    went each way. The billed numbers are None when the gateway could not say."""
    data: dict[str, Any] = {
        "state": "done",
        "kernel_id": companion.kernel_id,
        "gpu_type": companion.shape.gpu_type,
        "gpu_count": companion.shape.gpu_count,
        "wall_seconds": round(wall, 2),
        "gpu_seconds": None,
        "cost_usd": None,
        "since": since,
        "until": None,
        "sent": dict(outcome.sent_bytes) if outcome else {},
        "received": dict(outcome.received_bytes) if outcome else {},
    }
    if companion.kernel_id is not None and since != "":
        try:
            report = companion.api.usage(companion.kernel_id, since=since)
            data["gpu_seconds"] = float(report["total"]["gpu_seconds"])
            data["cost_usd"] = float(report["total"]["cost_usd"])
            data["until"] = str(report["now"])
        except (GpuMagicError, KeyError, TypeError, ValueError):
            pass
    return data


def footer_text(data: dict[str, Any]) -> str:
    """The footer as one line, for clients without the Lab front end (`jupyter execute`)."""
    parts = [f"{Shape(data['gpu_type'], data['gpu_count'])}", f"{data['wall_seconds']:.1f} s"]
    if data["gpu_seconds"] is None:
        parts.append("GPU time not known")
    else:
        parts.append(f"{data['gpu_seconds']:.1f} GPU-s billed · ${data['cost_usd']:.4f}")
    for key, verb in (("sent", "sent"), ("received", "received")):
        if data[key]:
            named = ", ".join(f"{n} ({human_bytes(b)})" for n, b in data[key].items())
            parts.append(f"{verb} {named}")
    return "%%gpu: " + " · ".join(parts)


def show_footer(
    companion: Companion, since: str | None, wall: float, outcome: Outcome | None
) -> None:
    from IPython.display import display

    data = run_footer(companion, since, wall, outcome)
    display({"text/plain": footer_text(data), RUN_MIME: data}, raw=True)


def cell_number(shell: Any) -> int:
    """The number of the cell running now, as "In[n]" shows it. IPython 9 counts it up before
    the cell runs and earlier versions after, but both store the cell in history first."""
    history = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None)
    return len(history) - 1 if history else int(shell.execution_count)


def _until(iso: str) -> str:
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if seconds <= 0:
        return "now"
    minutes, secs = divmod(int(seconds), 60)
    return f"in {minutes} min {secs} s" if minutes else f"in {secs} s"
