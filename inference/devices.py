"""Device specs: ``auto``, ``cpu``, ``cpu:N`` (N replicas), ``cuda``, ``cuda:0,cuda:1``."""

from __future__ import annotations

from nlpstream.inference.errors import DeviceError


def parse_devices(spec: str, cuda_count: int | None = None) -> list[str]:
    """Expand a device spec into one torch device string per replica.

    ``auto`` means every visible GPU, else one CPU replica; ``cuda`` every
    visible GPU; ``cpu:N`` N replicas sharing the CPU cores. Raises
    DeviceError for an unknown form or a GPU that is not visible.
    """
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    spec = spec.strip().lower()
    if spec in ("", "auto"):
        return [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    devices: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "cpu":
            devices.append("cpu")
        elif part.startswith("cpu:"):
            count = part[4:]
            if not count.isdigit() or int(count) < 1:
                raise DeviceError(f"invalid device {part!r}: use cpu:N with N >= 1 replicas")
            devices.extend(["cpu"] * int(count))
        elif part == "cuda":
            if cuda_count == 0:
                raise DeviceError("devices='cuda' but no CUDA device is visible")
            devices.extend(f"cuda:{i}" for i in range(cuda_count))
        elif part.startswith("cuda:") and part[5:].isdigit():
            if int(part[5:]) >= cuda_count:
                raise DeviceError(f"device {part!r} requested but {cuda_count} CUDA device(s) are visible")
            devices.append(part)
        else:
            raise DeviceError(f"invalid device {part!r}: expected auto, cpu, cpu:N, cuda or cuda:K")
    if not devices:
        raise DeviceError(f"device spec {spec!r} names no device")
    return devices
