"""`%%gpu` and `%gpu`: run one cell on a pooled GPU, with the notebook's variables going in and
out. Registered by `%load_ext jupyter_ext`, or at every kernel's start where gpupool is installed
(its IPython config, `etc/ipython/ipython_kernel_config.json`, lists the extension).

Loading is cheap: the companion kernel's modules (websockets, HTTP, pickling) are imported by
the first `%%gpu` cell, not at kernel start, and nothing reaches the gateway before then."""

from __future__ import annotations

import atexit
import sys
import time
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import (
    MagicArgumentParser,
    argument,
    magic_arguments,
    parse_argstring,
)
from traitlets import Int, Unicode

from gpupool.wire import iso, parse_iso

from .errors import GatewayError, GpuMagicError
from .shapes import Shape, parse_shape

if TYPE_CHECKING:
    from .companion import Companion, Outcome
    from .gateway_api import GatewayApi

COMMANDS = ("status", "release", "usage", "pull", "default")
MAX_IDLE_TIMEOUT = 7 * 24 * 3600  # the gateway's own ceiling; a tenant's may be lower


def _default_parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(
        prog="%gpu default",
        description="The GPU shape of %%gpu cells that name none (-t/-n), and the idle timeout "
        "of GPU kernels started from now. JupyterLab's GPU pool settings send this line.",
    )
    parser.add_argument("shape", nargs="?", help="TYPE or TYPE:COUNT, e.g. H100 or H100:2")
    parser.add_argument("--reset", action="store_true",
                        help="back to the configured c.GpuMagics values first")  # fmt: skip
    parser.add_argument("--idle-timeout", type=int, default=None, metavar="S",
                        help="seconds a GPU kernel may idle before it is suspended; 0: the "
                        "gateway's default")  # fmt: skip
    return parser


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
        # Set by `%gpu default` (JupyterLab's settings); None: the configured traits above.
        self.chosen_shape: Shape | None = None
        self.chosen_idle_timeout: int | None = None
        self.gateway_in_use = ""
        atexit.register(self.shutdown)

    @property
    def default_shape(self) -> Shape:
        return self.chosen_shape or Shape(self.gpu_type, self.gpu_count)

    @property
    def default_idle_timeout(self) -> int:
        chosen = self.chosen_idle_timeout
        return self.idle_timeout if chosen is None else chosen

    def api(self) -> GatewayApi:
        """The gateway, as configured, else GPUPOOL_URL / GPUPOOL_TOKEN, else the file that
        `gpupool login` writes: the same places the Jupyter server's pool kernels look."""
        from . import credentials
        from .gateway_api import GatewayApi

        try:
            url, token = credentials.resolve(self.gateway_url, self.token, who="%%gpu needs")
        except credentials.CredentialsError as error:
            raise GpuMagicError(str(error)) from None
        self.gateway_in_use = url
        return GatewayApi(url, token)

    # --- %%gpu ----------------------------------------------------------------------------

    @magic_arguments()
    @argument("-t", "--type", default=None, help="GPU type, e.g. H100 or A10G (default: "
              "%%gpu default, else GpuMagics.gpu_type).")  # fmt: skip
    @argument("-n", "--count", type=int, default=None, help="Number of GPUs (default: 1 with "
              "-t, else that of the default shape).")  # fmt: skip
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
          %gpu default [--reset] [TYPE[:COUNT]] [--idle-timeout S]
                          the shape of cells that name none, and the idle timeout of GPU
                          kernels started from now (JupyterLab's GPU pool settings send it)
        """
        if cell is None:
            self.command(line)
            return
        from .companion import Cell, CellOutput
        from .namespace import cell_names, parse_names, parse_size, sendable

        args = parse_argstring(self.gpu, line)
        try:
            max_bytes = parse_size(args.max_bytes or self.max_bytes)
            forced = set(parse_names(args.push))
            pull = parse_names(args.pull) if args.pull is not None else None
        except ValueError as error:
            raise UsageError(str(error)) from None
        if args.count is not None and args.count < 1:
            raise UsageError(f"-n {args.count}: a GPU kernel has at least one GPU")
        shape = self.shape_for(args.type, args.count, args.fresh)
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
        try:
            companion = self.ensure(shape, fresh=args.fresh, deadline=deadline)
        except GatewayError as error:
            raise explained(error, self.gateway_in_use) from None
        # What this run is billed: the gateway's ledger for this kernel from the gateway's "now"
        # before the cell (all of it, for a kernel started by this cell) to its "now" after.
        since = None if companion is not before else gateway_clock(companion)
        companion.last = None
        try:
            companion.run_cell(todo, shell.user_ns, CellOutput())
        finally:
            show_footer(companion, since, time.monotonic() - began, companion.last)

    def shape_for(self, gpu_type: str | None, count: int | None, fresh: bool) -> Shape:
        """A cell that names a shape gets it (-t alone: one GPU, as the cell reads); one that
        names none runs on the GPU kernel there is, else on the default shape. So a change of
        the default (JupyterLab's settings) never ends a GPU kernel that holds variables."""
        default = self.default_shape
        if gpu_type or count:
            return Shape(
                gpu_type.upper() if gpu_type else default.gpu_type,
                count or (1 if gpu_type else default.gpu_count),
            )
        current = self.companion
        if current is not None and current.kernel_id is not None and not fresh:
            return current.shape
        return default

    def ensure(self, shape: Shape, fresh: bool = False, deadline: float | None = None) -> Companion:
        """The companion kernel of this shape, started if there is none."""
        from .companion import Companion, Progress

        current = self.companion
        api = self.api()
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
            idle = self.default_idle_timeout
            env = {"KERNEL_IDLE_TIMEOUT": str(idle)} if idle else {}
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
            from .namespace import parse_names

            self.pull(parse_names(" ".join(rest)))
        elif action == "default":
            print(self.default(line.split(None, 1)[1] if len(words) > 1 else ""))

    def default(self, argstring: str) -> str:
        """`%gpu default [--reset] [TYPE[:COUNT]] [--idle-timeout S]`: set (or with nothing,
        show) the shape of `%%gpu` cells that name none and the idle timeout of GPU kernels
        started from now. `--reset` first goes back to the configured `c.GpuMagics` values, so
        the line JupyterLab sends says everything its settings hold."""
        args = _default_parser().parse_argstring(argstring)
        if args.idle_timeout is not None and not 0 <= args.idle_timeout <= MAX_IDLE_TIMEOUT:
            raise UsageError(
                f"--idle-timeout {args.idle_timeout}: seconds from 0 (the gateway's default) "
                f"to {MAX_IDLE_TIMEOUT}"
            )
        try:
            shape = parse_shape(args.shape) if args.shape else None
        except ValueError as error:
            raise UsageError(str(error)) from None
        if args.reset:
            self.chosen_shape = self.chosen_idle_timeout = None
        if shape is not None:
            self.chosen_shape = shape
        if args.idle_timeout is not None:
            self.chosen_idle_timeout = args.idle_timeout
        idle = self.default_idle_timeout
        text = f"%%gpu cells that name no shape run on {self.default_shape}; " + (
            f"GPU kernels started from now suspend after {idle} s idle"
            if idle
            else "GPU kernels get the gateway's idle timeout"
        )
        running = self.companion
        if running is not None and running.kernel_id is not None:
            if running.shape != self.default_shape:
                text += (f"; the {running.shape} GPU kernel running now stays for them until "
                         "`%gpu release`")  # fmt: skip
        return text

    def status(self) -> str:
        companion = self.companion
        if companion is None or companion.kernel_id is None:
            return (f"no GPU kernel yet: the next %%gpu cell starts one "
                    f"({self.default_shape})")  # fmt: skip
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
        api = self.api()
        try:
            report = api.usage()
        except GatewayError as error:
            if error.status in (404, 405):
                return f"the gateway at {api.url} has no usage report (/api/usage)"
            raise explained(error, api.url) from None
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
        from .companion import Cell, CellOutput

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


def gateway_clock(companion: Companion) -> str | None:
    """The gateway's clock now, read from this machine's clock and the offset between the two
    that the last footer's report showed (within half that request's round trip, a few ms),
    never before that report's time; asked of the gateway (`gateway_now`) when no report has
    come yet. Asking cost each cell a request (5 to 8 ms of an empty cell's ~30)."""
    if companion.clock_offset is None or not companion.last_until:
        return gateway_now(companion)
    return iso(max(time.time() + companion.clock_offset, parse_iso(companion.last_until)))


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
            asked = time.time()
            report = companion.api.usage(companion.kernel_id, since=since)
            answered = time.time()
            data["gpu_seconds"] = float(report["total"]["gpu_seconds"])
            data["cost_usd"] = float(report["total"]["cost_usd"])
            data["until"] = str(report["now"])
            # The gateway read its clock about halfway through the request.
            companion.clock_offset = parse_iso(data["until"]) - (asked + answered) / 2
            companion.last_until = data["until"]
        except (GpuMagicError, KeyError, TypeError, ValueError):
            pass
    return data


def footer_text(data: dict[str, Any]) -> str:
    """The footer as one line, for clients without the Lab front end (`jupyter execute`)."""
    from .namespace import human_bytes

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

    from .companion import RUN_MIME

    data = run_footer(companion, since, wall, outcome)
    display({"text/plain": footer_text(data), RUN_MIME: data}, raw=True)


def explained(error: GatewayError, url: str) -> GatewayError:
    """A gateway that cannot be reached or refuses the token, said with what to check."""
    if error.status not in (0, 401):
        return error
    from .credentials import explain

    return GatewayError(error.status, explain(error, url))


def cell_number(shell: Any) -> int:
    """The number of the cell running now, as "In[n]" shows it. IPython 9 counts it up before
    the cell runs and earlier versions after, but both store the cell in history first."""
    history = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None)
    return len(history) - 1 if history else int(shell.execution_count)


def _until(when: str) -> str:
    try:
        seconds = parse_iso(when) - time.time()
    except ValueError:
        return "?"
    if seconds <= 0:
        return "now"
    minutes, secs = divmod(int(seconds), 60)
    return f"in {minutes} min {secs} s" if minutes else f"in {secs} s"
