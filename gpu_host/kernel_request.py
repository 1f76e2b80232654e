"""A request for a kernel, read from the JSON body of `POST /api/kernels`, with every check."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from gpupool.wire import CPU, KERNEL_NAMES, MAX_GPUS_PER_KERNEL, Shape, shape_of_kernel_name

from .tenants import TenantError, check_tenant_name

MAX_BODY_BYTES = 64 * 1024
OWNER = re.compile(r"[A-Za-z0-9_-]{0,64}")
MAX_ENV_KEYS = 256
MAX_ENV_VALUE = 4096
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class RequestError(ValueError):
    """A request that cannot be served as written; the message says what to change."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class KernelRequest:
    name: str = "python3"
    shape: Shape = CPU
    gpus: list[str] | None = None  # exact GPU UUIDs, when the caller chose them
    shared: bool = False  # may share its GPUs with other kernels that also asked to share
    tenant: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    owner: str = ""  # the caller's own id for the kernel (the gateway's), reported back as is


def _env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError("env must be a JSON object of string keys and string values.")
    if len(value) > MAX_ENV_KEYS:
        raise RequestError(f"env has {len(value)} keys; at most {MAX_ENV_KEYS} are allowed.")
    for key, text in value.items():
        if not ENV_KEY.match(key):
            raise RequestError(
                f"env key {key[:40]!r} is not a valid variable name (letters, digits, _)."
            )
        if not isinstance(text, str):
            raise RequestError(f"env value of {key} must be a string, not {type(text).__name__}.")
        if len(text) > MAX_ENV_VALUE or "\0" in text or "\n" in text:
            raise RequestError(
                f"env value of {key} must be at most {MAX_ENV_VALUE} characters with no NUL or "
                "newline."
            )
    return dict(value)


def _count(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{where} must be a whole number from 0 to {MAX_GPUS_PER_KERNEL}.")
    if not 0 <= value <= MAX_GPUS_PER_KERNEL:
        raise RequestError(f"{where} is {value}; it must be from 0 to {MAX_GPUS_PER_KERNEL}.")
    return value


def parse_kernel_request(body: bytes) -> KernelRequest:
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(
            f"the request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted.", 413
        )
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}.") from None
    if not isinstance(data, dict):
        raise RequestError('the request body must be a JSON object such as {"name": "python3"}.')
    request = KernelRequest(env=_env(data.get("env")))

    name = data.get("name") or "python3"
    if not isinstance(name, str):
        raise RequestError(f"name must be a string: {KERNEL_NAMES}.")
    named = shape_of_kernel_name(name)
    if named is None:
        raise RequestError(f"no kernel named {name[:80]!r} on this host; use {KERNEL_NAMES}.")
    gpu_type, count = named.gpu_type, _count(named.gpu_count, "the name's count")
    request.name = name

    type_value = data.get("gpu_type", request.env.get("KERNEL_GPU_TYPE"))
    if type_value is not None:
        if not isinstance(type_value, str) or not type_value.strip():
            raise RequestError('gpu_type must be a GPU type such as "H100".')
        gpu_type = type_value.strip().upper()
        count = count or 1
    count_value = data.get("gpu_count", request.env.get("KERNEL_GPU_COUNT"))
    if count_value is not None:
        count = _count(count_value, "gpu_count")

    gpus = data.get("gpus")
    if gpus is not None:
        if not isinstance(gpus, list) or not all(isinstance(u, str) and u for u in gpus):
            raise RequestError("gpus must be a list of GPU UUID strings.")
        if len(set(gpus)) != len(gpus) or len(gpus) > MAX_GPUS_PER_KERNEL:
            raise RequestError(
                f"gpus must name each GPU once, at most {MAX_GPUS_PER_KERNEL} of them."
            )
        request.gpus = list(gpus)
        count = len(gpus)
    request.shape = Shape(gpu_type if count else None, count)

    shared = data.get("shared", False)
    if not isinstance(shared, bool):
        raise RequestError("shared must be true or false.")
    request.shared = shared
    owner = data.get("owner", "")
    if not isinstance(owner, str) or not OWNER.fullmatch(owner):
        raise RequestError("owner must be up to 64 letters, digits, '-' or '_'.")
    request.owner = owner
    tenant = data.get("tenant")
    if tenant is not None:
        try:
            request.tenant = check_tenant_name(tenant)
        except TenantError as error:
            raise RequestError(str(error)) from None
    return request
