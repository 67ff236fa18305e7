"""Which device a model runs on: one picker for the generator, the voice and the listening models.

`auto` takes CUDA when torch sees a GPU, else the CPU. A device named explicitly (`cuda`,
`cuda:N`) must be there: otherwise DeviceUnavailable names the config key and what was found
instead (no GPU, fewer GPUs than the index, a torch build without CUDA).
"""

from __future__ import annotations

from core.config.schema import Config


class DeviceUnavailable(RuntimeError):
    """A configured device is not on this machine; the message names the key and what is there."""


def pick_device(wanted: str, key: str) -> str:
    """The torch device for a model whose config key `key` says `wanted` ("auto", "cpu", "cuda", "cuda:N")."""
    import torch

    if wanted == "cpu":
        return "cpu"
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    problem = missing_device(wanted)
    if problem:
        raise DeviceUnavailable(f"{key} is {wanted!r} but {problem}")
    return wanted


def missing_device(wanted: str) -> str | None:
    """What keeps the CUDA device `wanted` from being used here, or None when it is there."""
    import torch

    if torch.version.cuda is None:
        return f"no CUDA device is available: this torch build ({torch.__version__}) is CPU-only"
    if not torch.cuda.is_available():
        return "no CUDA device is available (no GPU is visible here, or its driver is missing)"
    index = int(wanted.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        return f"there is no CUDA device {index}: this machine has {count} (cuda:0 to cuda:{count - 1})"
    return None


def configured_device_problems(config: Config) -> list[str]:
    """One line for each device the config names explicitly that is not here (generator.device and
    device_map; voice.device and voice.listen.device when voice and listening are on)."""
    wanted = [("generator.device", config.generator.device)]
    if config.voice.enabled:
        wanted.append(("voice.device", config.voice.device))
        if config.voice.listen.enabled:
            wanted.append(("voice.listen.device", config.voice.listen.device))
    problems = []
    for key, device in wanted:
        problem = missing_device(device) if device.startswith("cuda") else None
        if problem:
            problems.append(f"{key} is {device!r} but {problem}")
    if config.generator.device_map == "auto" and config.generator.device != "cpu":
        problem = missing_device("cuda")
        if problem:
            problems.append(f"generator.device_map is 'auto' (spread over the GPUs) but {problem}")
    return problems


def cpu_reason() -> str:
    """Why `auto` runs on the CPU here (empty when a GPU is there)."""
    return missing_device("cuda") or ""
