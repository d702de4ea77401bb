"""``--settings``: which KV settings to run, as per-request ``custom_params``.

    vanilla;server;kara:keep=0.5;kara:keep=0.25,chunk=1;kara:budget=128

- ``vanilla``: ``custom_params={"kv_policy": "none"}``, the plugin's per-request opt-out, so
  the same server gives the full-KV baseline
- ``server``: no ``custom_params``; the server's own ``--kv-policy`` / ``--kara-*`` flags
- ``NAME:key=value,...``: the server's policy with these per-request overrides. NAME is a
  label: a request cannot switch policy, so it must be the server's ``--kv-policy`` (or
  ``kara``, the generic name). Keys: ``keep`` (kara_keep_ratio), ``budget`` (kara_budget),
  ``chunk`` (kara_chunk_size), ``chunk_fraction`` (kara_chunk_fraction); the server checks
  ranges and answers a bad value with an HTTP 400 naming the setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from kara_sglang.accuracy import InputError

# short key -> (the plugin's custom_params key, type)
KEYS: Dict[str, Tuple[str, Callable[[str], Any]]] = {
    "keep": ("kara_keep_ratio", float),
    "budget": ("kara_budget", int),
    "chunk": ("kara_chunk_size", int),
    "chunk_fraction": ("kara_chunk_fraction", float),
}
OPT_OUT = {"kv_policy": "none"}
GENERIC_NAME = "kara"


@dataclass(frozen=True)
class Setting:
    label: str  # as written in --settings: the row's name
    custom_params: Optional[Dict[str, Any]]  # None: send none (the server's flags)
    policy_name: Optional[str] = None  # NAME of a NAME:k=v setting

    @property
    def is_vanilla(self) -> bool:
        return self.custom_params == OPT_OUT


def parse_setting(text: str) -> Setting:
    text = text.strip()
    if text == "vanilla":
        return Setting(text, dict(OPT_OUT))
    if text == "server":
        return Setting(text, None)
    name, sep, body = text.partition(":")
    name = name.strip()
    if not name or not name.replace("_", "").isalnum():
        raise InputError(f"--settings: cannot read {text!r} (vanilla, server or NAME:key=value,...)")
    params: Dict[str, Any] = {}
    for item in body.split(",") if sep else ():
        key, eq, value = (part.strip() for part in item.partition("="))
        if key not in KEYS:
            raise InputError(f"--settings: {text!r}: unknown key {key!r} (known: {', '.join(KEYS)})")
        if not eq or not value:
            raise InputError(f"--settings: {text!r}: {key} needs a value ({key}=...)")
        param, kind = KEYS[key]
        try:
            params[param] = kind(value)
        except ValueError:
            raise InputError(f"--settings: {text!r}: {key}={value} is not {'an integer' if kind is int else 'a number'}") from None
    if not params:
        raise InputError(f"--settings: {text!r}: give at least one key=value, or use 'server'")
    return Setting(text, params, policy_name=name)


def parse_settings(text: str) -> List[Setting]:
    settings = [parse_setting(part) for part in text.split(";") if part.strip()]
    if not settings:
        raise InputError("--settings: no settings given")
    return settings


def check_against_server(settings: List[Setting], server_policy: Optional[str]) -> None:
    """A NAME that is neither the server's policy nor ``kara`` would mislabel its row, and on a
    server without a policy it would measure nothing but vanilla."""
    if server_policy is None:
        return
    for setting in settings:
        name = setting.policy_name
        if name is not None and server_policy == "none":
            raise InputError(f"--settings: {setting.label!r}: the server runs --kv-policy none, which "
                             f"compresses nothing; start it with a policy (vanilla is the per-request opt-out)")
        if name is not None and name not in (server_policy, GENERIC_NAME):
            raise InputError(f"--settings: {setting.label!r}: the server runs --kv-policy {server_policy}; "
                             f"a request cannot switch policy (name it {server_policy} or {GENERIC_NAME})")
