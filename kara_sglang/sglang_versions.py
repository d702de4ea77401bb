"""Which SGLang releases the plugin supports, and the start-up refusal of any other.

Every supported release is wrapped at the same touch points: the dotted paths in
``patches/*.py`` resolve unchanged from 0.5.17 to 0.5.23 (``kara_sglang.plugin`` fails the
start-up if SGLang cannot apply one). What moved between releases is handled where it is read:
the ``Req`` KV fields (:mod:`kara_sglang.req_kv`) and how the flags ride on ``ServerArgs``
(``patches/server_args.py``). docs/sglang-versions.md has the per-release table.
"""

from __future__ import annotations

import re
from typing import Tuple

from kara_sglang.config import KaraConfigError

OLDEST, NEWEST = "0.5.17", "0.5.23"
# What each release was verified on (README, docs/sglang-versions.md).
VERIFIED = {"0.5.17": "CPU (CI) and GPU (H100, H200)", "0.5.23": "CPU (CI)"}
# PD decode servers: their retraction path (kara_sglang/decode_offload.py) follows 0.5.17's
# Req.offload_kv_cache / load_kv_cache, which later releases replaced.
PD_DECODE = ("0.5.17",)


def release(version: str) -> Tuple[int, ...]:
    """``"0.5.23"`` -> ``(0, 5, 23)`` (local or pre-release suffixes dropped)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):  # "0rc1": a pre-release of 0; nothing after it counts
            break
    return tuple(parts)


def check_supported(version: str) -> None:
    """One line naming the release when it is outside the supported range."""
    if not release(OLDEST) <= release(version) <= release(NEWEST):
        raise KaraConfigError(
            f"--kv-policy: SGLang {version} is not supported; kara-sglang supports SGLang "
            f"{OLDEST} to {NEWEST} (pip install 'sglang>={OLDEST},<={NEWEST}')")


def installed() -> str:
    import sglang

    return sglang.__version__
