"""What a host sends when it registers and in each heartbeat, checked field by field before any
of it is stored or used: a bad report is a 400 naming the field, and changes nothing.

Only the fields the gateway uses are kept (a newer host may send more); each is checked for the
type and range the pool, the kernelspecs and the database rely on, so that one host cannot make
`/api/gpus` fail for every tenant or leave a row that stops the gateway from starting."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from gpupool.wire import MAX_GPUS_PER_HOST

from .errors import ApiError

MAX_KERNELS = 4096  # per host, ended ones included
MAX_TEXT = 255
MAX_REASON = 2000
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB per GPU
MAX_UTILIZATION = 100  # percent
# Upper case, so that it reads back from a kernelspec name (python3-gpu-<type lower>-x<count>).
GPU_TYPE = re.compile(r"^[A-Z0-9][A-Z0-9.-]{0,31}$")
UUID_TEXT = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable, no spaces: NVML's GPU-… or MIG-…


def bad(field: str, rule: str) -> ApiError:
    return ApiError(400, f"the host report's {field} {rule}; nothing was stored. Upgrade or fix "
                         "the host agent so that it sends what this gateway reads.")  # fmt: skip


def text(value: Any, field: str, most: int = MAX_TEXT, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > most or "\0" in value:
        raise bad(field, f"must be a non-empty string of at most {most} characters")
    return value


def count(value: Any, field: str, most: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise bad(field, f"must be a whole number from 0 to {most}")
    return value


def utilization(value: Any, field: str) -> int | None:
    """NVML's percent busy, or None where it cannot say (MIG instances, some older cards)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_UTILIZATION:
        raise bad(field, f"must be a whole percent from 0 to {MAX_UTILIZATION}, or null")
    return value


def host_url(value: Any) -> str:
    url = text(value, "url")
    assert url is not None
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or port == 0
        or parts.query
        or parts.fragment
        or any(c.isspace() for c in url)
    ):
        raise bad(
            "url", "must be the http(s) address the gateway reaches the host at, with a real "
            "port, such as http://10.0.0.5:8890",
        )  # fmt: skip
    return url.rstrip("/")


def gpu(value: Any, index: int) -> dict[str, Any]:
    field = f"gpus[{index}]"
    if not isinstance(value, dict):
        raise bad(field, "must be an object with uuid, gpu_type and memory_total")
    uuid = value.get("uuid")
    if not isinstance(uuid, str) or not UUID_TEXT.match(uuid):
        raise bad(f"{field}.uuid", "must be the GPU's UUID, 1 to 128 printable characters")
    gpu_type = value.get("gpu_type")
    if not isinstance(gpu_type, str) or not GPU_TYPE.match(gpu_type):
        raise bad(
            f"{field}.gpu_type", "must be a GPU type such as H100 or A100-1G.10GB (upper-case "
            "letters, digits, dots and dashes, at most 32)",
        )  # fmt: skip
    return {
        "uuid": uuid,
        "gpu_type": gpu_type,
        "memory_total": count(
            value.get("memory_total", 0), f"{field}.memory_total", MAX_MEMORY_BYTES
        ),
        # What a tenant sees of its kernel's GPUs; an older host sends neither.
        "memory_used": count(value.get("memory_used", 0), f"{field}.memory_used", MAX_MEMORY_BYTES),
        "utilization": utilization(value.get("utilization"), f"{field}.utilization"),
        "warm": count(value.get("warm", 0), f"{field}.warm", MAX_KERNELS),
    }


def gpus(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_GPUS_PER_HOST:
        raise bad("gpus", f"must be a list of at most {MAX_GPUS_PER_HOST} GPUs")
    checked = [gpu(g, i) for i, g in enumerate(value)]
    if len({g["uuid"] for g in checked}) < len(checked):
        raise bad("gpus", "names one GPU uuid twice")
    return checked


def kernel(value: Any, index: int) -> dict[str, Any]:
    field = f"kernels[{index}]"
    if not isinstance(value, dict):
        raise bad(field, "must be a kernel model object")
    model: dict[str, Any] = {
        "id": text(value.get("id"), f"{field}.id", 64),
        "execution_state": text(value.get("execution_state"), f"{field}.execution_state", 32),
    }
    for key, most in (("last_activity", 64), ("reason", MAX_REASON)):
        if value.get(key) is not None:
            if not isinstance(value[key], str) or len(value[key]) > most:
                raise bad(f"{field}.{key}", f"must be a string of at most {most} characters")
            model[key] = value[key]
    extra = value.get("gpupool")
    if extra is not None:
        if not isinstance(extra, dict):
            raise bad(f"{field}.gpupool", "must be an object")
        owner = extra.get("owner") or ""  # "": a kernel the host started for someone else
        if not isinstance(owner, str) or len(owner) > 64:
            raise bad(f"{field}.gpupool.owner", "must be a string of at most 64 characters")
        model["gpupool"] = {"owner": owner}
    return model


def kernels(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_KERNELS:
        raise bad("kernels", f"must be a list of at most {MAX_KERNELS} kernel models")
    return [kernel(k, i) for i, k in enumerate(value)]


def read_registration(body: dict[str, Any]) -> dict[str, Any]:
    """A registration as `GatewayState.register_host` takes it: url, name, gpus, kernels, and
    isolates when the host says whether it runs each tenant's kernels as its own Unix user."""
    report: dict[str, Any] = {"url": host_url(body.get("url")), "gpus": gpus(body.get("gpus"))}
    report["name"] = text(body.get("name"), "name", optional=True) or report["url"]
    report["kernels"] = kernels(body.get("kernels", []))
    if "isolates" in body:
        if not isinstance(body["isolates"], bool):
            raise bad("isolates", "must be true or false")
        report["isolates"] = body["isolates"]
    return report


def read_heartbeat(body: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat as `GatewayState.heartbeat` takes it; gpus and kernels are each optional."""
    report: dict[str, Any] = {}
    if "gpus" in body:
        report["gpus"] = gpus(body["gpus"])
    if "kernels" in body:
        report["kernels"] = kernels(body["kernels"])
    return report
