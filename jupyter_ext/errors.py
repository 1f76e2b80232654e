"""Errors `%%gpu` raises in the notebook. Its own errors show as one line of advice, not a
traceback through the extension; a remote exception shows the GPU kernel's traceback."""

from __future__ import annotations

from collections.abc import Callable


class GpuMagicError(Exception):
    """Something `%%gpu` could not do, said in words a person can act on."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class GatewayError(GpuMagicError):
    """The gateway refused a request; `status` is its HTTP status (0: not reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class GpuVersionMismatch(GpuMagicError):
    """The two kernels could not read each other's pickles."""


class GpuTransferError(GpuMagicError):
    """Variables could not be sent or loaded (too large, missing package, unpicklable)."""


class GpuKernelLost(GpuMagicError):
    """The companion GPU kernel ended or its connection broke during a cell."""


class GpuTimeout(GpuMagicError, TimeoutError):
    """A cell ran over its --timeout and was interrupted on the GPU kernel."""


class RemoteError(Exception):
    """An exception from the GPU kernel whose type cannot be recreated here."""

    def __init__(self, type_name: str, message: str, traceback: list[str] | None = None) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback or []

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"

    def _render_traceback_(self) -> list[str]:
        return self.traceback or [str(self)]


def with_remote_traceback(error: BaseException, lines: list[str]) -> BaseException:
    """Make IPython show `lines` (the GPU kernel's traceback) when `error` is raised here."""
    render: Callable[[], list[str]] = lambda: list(lines)  # noqa: E731
    try:
        error._render_traceback_ = render  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        pass
    return error
