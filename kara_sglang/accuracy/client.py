"""HTTP to a running SGLang server: is it there, what does it serve, and ``/generate``.

A failed request (HTTP error, timeout, dropped connection) becomes a :class:`Reply` with an
error message, so one bad request is counted in its row instead of ending the run; only an
unreachable server at start stops the command.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from kara_sglang.accuracy import InputError

PROBE_TIMEOUT_S = 10


@dataclass(frozen=True)
class ServerInfo:
    model: Optional[str]  # /get_model_info's model_path
    kv_policy: Optional[str]  # the plugin's policy from /server_info; None without the plugin
    sglang_version: Optional[str] = None  # /server_info's "version"
    # The plugin's server settings from /server_info (window, buffer, chunk_size, keep_ratio,
    # budget); None without the plugin or on a plugin that does not report them.
    kara_config: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class Reply:
    text: str
    meta_info: Dict[str, Any]
    error: Optional[str] = None


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return getattr(reason, "strerror", None) or str(reason)


def probe_server(url: str) -> ServerInfo:
    """Raises :class:`InputError` (one line) if nothing answers at ``url``."""
    model = None
    try:
        info = _get_json(url + "/get_model_info", PROBE_TIMEOUT_S)
        model = info.get("model_path") if isinstance(info, dict) else None
    except urllib.error.HTTPError:
        try:  # something answers but has no model info: it must at least be healthy
            urllib.request.urlopen(url + "/health", timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError as err:
            raise InputError(f"the server at {url} is not healthy (/health: HTTP {err.code})") from None
        except (urllib.error.URLError, OSError) as err:
            raise InputError(f"cannot reach the server at {url} ({_reason(err)})") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise InputError(f"cannot reach the server at {url} ({_reason(err)})") from None
    return _with_server_info(url, ServerInfo(model=model, kv_policy=None))


def _with_server_info(url: str, server: ServerInfo) -> ServerInfo:
    """The plugin's policy and settings and SGLang's version from ``/server_info``, where the
    server has them (an older SGLang or no plugin: left None, the names are not checked)."""
    try:
        info = _get_json(url + "/server_info", PROBE_TIMEOUT_S)
    except Exception:
        return server
    if not isinstance(info, dict):
        return server
    version = info.get("version")
    try:
        kara = info["internal_states"][0]["kara"]
    except (KeyError, IndexError, TypeError):
        kara = {}
    return ServerInfo(model=server.model, kv_policy=kara.get("kv_policy"),
                      sglang_version=str(version) if version else None, kara_config=kara.get("config"))


def _error_message(err: urllib.error.HTTPError) -> str:
    body = err.read().decode("utf-8", "replace")
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            inner = data.get("error", data)
            body = inner.get("message", body) if isinstance(inner, dict) else str(inner)
    except ValueError:
        pass
    return f"HTTP {err.code}: {' '.join(str(body).split())[:300]}"


def generate(url: str, payload: Dict[str, Any], timeout: float) -> Reply:
    request = urllib.request.Request(url + "/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            out = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return Reply("", {}, _error_message(err))
    except (urllib.error.URLError, OSError, socket.timeout) as err:
        return Reply("", {}, f"request failed: {_reason(err)}")
    except ValueError as err:
        return Reply("", {}, f"bad response: {err}")
    if isinstance(out, list):  # SGLang answers a batch with a list; one prompt is sent
        out = out[0] if out else {}
    return Reply(str(out.get("text", "")), out.get("meta_info") or {})


def generate_all(url: str, payloads: List[Dict[str, Any]], concurrency: int, timeout: float,
                 on_done: Callable[[int, Reply], None] = lambda i, reply: None) -> List[Reply]:
    """Replies in the order of ``payloads``, ``concurrency`` requests in flight; ``on_done(i,
    reply)`` runs on this thread as each reply arrives."""
    replies: List[Optional[Reply]] = [None] * len(payloads)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {pool.submit(generate, url, p, timeout): i for i, p in enumerate(payloads)}
        for future in as_completed(futures):
            i = futures[future]
            replies[i] = future.result()
            on_done(i, replies[i])
    except BaseException:
        # Ctrl-C: drop the queued requests instead of waiting for all of them (the ones in
        # flight end with the process).
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return replies  # type: ignore[return-value]
