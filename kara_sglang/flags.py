"""The ``--kv-policy`` / ``--kara-*`` flags: one table, shared by the CLI, ``sglang.Engine``
keyword arguments and per-request ``custom_params``.

Each flag maps to a :class:`KaraConfig` field. On ``ServerArgs`` (and as ``Engine`` keyword
arguments) the attribute name is the flag with dashes as underscores (``kara_window``);
per-request overrides use the same names inside ``sampling_params.custom_params``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from kara_sglang.config import (POLICY_NAMES, RECALL_DIGESTS, RECALL_KV, SCOPES, VOTE_HEAD_MODES, KaraConfig,
                                KaraConfigError, check_custom_params)
from kara_sglang.session_continue import KEY as SESSION_CONTINUE_KEY


def _layer_list(text: Any):
    if text is None or isinstance(text, (list, tuple)):
        return text
    return tuple(int(x) for x in str(text).split(",") if x.strip())


@dataclass(frozen=True)
class Flag:
    attr: str  # ServerArgs attribute / Engine kwarg / custom_params key
    field: str  # KaraConfig field
    parse: Callable[[Any], Any]
    help: str
    choices: Optional[tuple] = None
    per_request: bool = False  # may a single request override it?


FLAGS = (
    Flag("kv_policy", "policy", str, "KV-cache policy applied while decoding (none = vanilla SGLang).",
         POLICY_NAMES, per_request=True),
    Flag("kara_window", "window", int, "Kara window W: decode tokens compressed at once (default 512)."),
    Flag("kara_buffer", "buffer", int,
         "Kara buffer U: newest tokens kept uncompressed (default 64; on hybrid sliding-window "
         "models the sliding window + 1, the least that covers it); threshold, streaming, "
         "longflow: the decode cache is cut back to the budget when it reaches budget + U."),
    Flag("kara_keep_ratio", "keep_ratio", float, "Share of each window kept, in (0, 1] (default 0.25).",
         per_request=True),
    Flag("kara_budget", "budget", int,
         "Tokens kept per window (kara) or per decode cache (threshold, streaming, longflow: "
         "required).",
         per_request=True),
    Flag("kara_chunk_size", "chunk_size", int, "Token2Chunk chunk length gamma; 1 disables chunks (default 8).",
         per_request=True),
    Flag("kara_chunk_fraction", "chunk_fraction", float, "Share of the budget spent on chunks (default 0.5).",
         per_request=True),
    Flag("kara_core_fraction", "core_fraction", float,
         "cask: share of each window's budget kept exactly as the core; the rest holds merged "
         "scratch (default 0.5).", per_request=True),
    Flag("kara_vote_layers", "vote_layers", _layer_list, "Comma-separated layer ids whose queries vote."),
    Flag("kara_num_vote_layers", "num_vote_layers", int,
         "Layers that vote, spread evenly, when --kara-vote-layers is not given (default 4)."),
    Flag("kara_vote_heads", "vote_heads", str, "group: one query per KV head; all: every query head "
         "(longflow always stores every head).",
         VOTE_HEAD_MODES),
    Flag("kara_sink", "sink", int, "streaming: first decode tokens always kept (default 4)."),
    Flag("kara_scope", "scope", str,
         "What may be compressed: reasoning = only the thinking segment, up to the end-of-thinking "
         "marker of --reasoning-parser; all = every decoded token; auto (default) = reasoning when "
         "--reasoning-parser is set, else all.", SCOPES),
    Flag("kara_recall_tokens", "recall_tokens", int,
         "kara: evicted tokens each decode step attends to again, per layer and KV head, chosen by "
         "its query (default 0 = off). An accuracy emulation: evicted KV stays allocated; needs "
         "page size 1 and --disable-cuda-graph."),
    Flag("kara_recall_digest", "recall_digest", str,
         "What ranks evicted tokens for recall: exact keys, or keys at 2/3/4 bits (default exact).",
         RECALL_DIGESTS),
    Flag("kara_recall_lag", "recall_lag", int,
         "Recall ranks with the step's own query (0, default) or the previous step's (1)."),
    Flag("kara_recall_kv", "recall_kv", str,
         "The recalled tokens' K and V as attended: exact (default), or rounded to 2/3/4/8 bits "
         "per 32 channels (the accuracy of a low-precision tier of evicted KV).", RECALL_KV),
    Flag("kara_recall_tier_tokens", "recall_tier_tokens", int,
         "kara recall: a GPU tier of this many tokens (all layers) holds evicted K and V at "
         "--kara-recall-kv bits (2/4/8) and their pool slots are freed; windows that find it full "
         "are evicted as without recall (default 0: the emulation holds evicted slots in the pool)."),
    Flag("kara_recall_pages", "recall_pages", int,
         "kara recall tier: rank 16-token pages by their key bounds, then only the tokens of the "
         "best N pages (default 0: every tier token ranked each step). N x 16 must cover "
         "--kara-recall-tokens; the bounds add a fifth to a 4-bit tier's bytes."),
    Flag("kara_recall_horizon", "recall_horizon", int,
         "kara recall tier: keep only each request's last N evicted tokens in the tier; a new "
         "window drops the oldest (whole 16-token pages), which are then gone as without recall "
         "(default 0: every stored token until the request ends). At least the window."),
)
FLAGS_BY_ATTR: Dict[str, Flag] = {f.attr: f for f in FLAGS}


def cli_name(flag: Flag) -> str:
    return "--" + flag.attr.replace("_", "-")


# The attribute of SGLang's ServerArgs that carries the flags' values (a dict by attr name).
FLAGS_ATTR = "_kara_flags"


def config_from_attrs(source: Any) -> KaraConfig:
    """Build the server's config from SGLang's ``ServerArgs`` (the values it carries under
    :data:`FLAGS_ATTR`) or from any object with the flag attributes (an argparse namespace)."""
    values = {}
    for flag in FLAGS:
        value = _raw_value(source, flag.attr)
        if value is not None:
            values[flag.field] = flag.parse(value)
    if "policy" not in values:
        values["policy"] = "none"
    return KaraConfig(**values)


def _raw_value(source: Any, attr: str) -> Any:
    """The value ``source`` carries for flag ``attr`` (``None``: not set): from ServerArgs'
    :data:`FLAGS_ATTR` dict, or an attribute of a namespace."""
    carried = getattr(source, FLAGS_ATTR, None)
    return carried.get(attr) if carried is not None else getattr(source, attr, None)


def given(source: Any, attr: str) -> bool:
    """Whether the flag ``attr`` (e.g. ``"kara_buffer"``) was set, on the command line or as an
    Engine keyword, rather than left to its default."""
    return _raw_value(source, attr) is not None


def request_overrides(server: KaraConfig, custom_params: Optional[Mapping[str, Any]]) -> KaraConfig:
    """The config of one request: the server's, with the request's ``custom_params`` applied.

    Raises :class:`KaraConfigError` (one line, naming the key) for unknown or bad values.
    """
    if not custom_params:
        return server
    check_custom_params(custom_params)
    changes = {}
    for key, value in custom_params.items():
        flag = FLAGS_BY_ATTR.get(key)
        if flag is None:
            if key == SESSION_CONTINUE_KEY:
                continue  # not a config field: read by kara_sglang.session_continue
            if key.startswith("kara_"):
                raise KaraConfigError(f"{key}: unknown kara setting")
            continue
        if not flag.per_request:
            raise KaraConfigError(f"{key}: fixed by the server (--{key.replace('_', '-')}), not per request")
        try:
            changes[flag.field] = flag.parse(value)
        except (TypeError, ValueError):
            raise KaraConfigError(f"{key}: cannot use {value!r}") from None
    if not changes:
        return server
    policy = changes.get("policy", server.policy)
    if policy not in ("none", server.policy):
        raise KaraConfigError(
            f"kv_policy: a request may opt out ('none') or keep the server's policy "
            f"({server.policy!r}), not switch to {policy!r}")
    return server.with_overrides(**changes)
