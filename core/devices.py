"""Which device a model runs on: one picker for the generator, the voice and the listening models.

`auto` takes CUDA when torch sees a GPU, else the CPU. A device named explicitly (`cuda`,
`cuda:N`) must be there: otherwise DeviceUnavailable names the config key and what was found
instead (no GPU, fewer GPUs than the index, a torch build without CUDA).
"""

from __future__ import annotations


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
