"""``ServerArgs``: the ``--kv-policy`` / ``--kara-*`` flags, ``Engine(kv_policy=...)`` and
the start-up checks.

Wraps ``sglang.srt.server_args.ServerArgs.add_cli_args`` (AFTER: add the flags),
``ServerArgs.from_cli_args`` (AROUND: keep their values, which SGLang drops because they
are not dataclass fields) and ``ServerArgs.__init__`` (AROUND: accept them as keyword
arguments). The values ride on the ``ServerArgs`` object, which SGLang pickles into the
scheduler process. Bad values stop the launch with one line naming the flag.
"""

from __future__ import annotations

import logging
import sys

from kara_patches._patch import Patch
from kara_sglang import sglang_versions
from kara_sglang.config import KaraConfigError
from kara_sglang.flags import FLAGS, FLAGS_ATTR, cli_name, config_from_attrs

logger = logging.getLogger("kara_sglang")


def check_disaggregation(policy: str, mode) -> None:
    """Prefill/decode disaggregation: Kara compresses decode tails, so it runs on decode
    servers; a prefill server has nothing to compress."""
    mode = str(mode or "null")
    if policy == "none" or mode in ("null", "None", "decode"):
        return
    if mode == "prefill":
        raise KaraConfigError(
            f"--kv-policy {policy}: a prefill server (--disaggregation-mode prefill) never decodes, so "
            f"there is nothing to compress; start prefill servers with --kv-policy none and put the "
            f"policy on the decode servers")
    raise KaraConfigError(f"--kv-policy {policy}: unknown --disaggregation-mode {mode}")


def check_supported(server_args) -> None:
    """Validate the policy settings and refuse the SGLang features they cannot run with."""
    config = config_from_attrs(server_args)
    if config.policy == "none":
        return
    version = sglang_versions.installed()
    sglang_versions.check_supported(version)
    check_disaggregation(config.policy, getattr(server_args, "disaggregation_mode", None))
    refuse = []
    if getattr(server_args, "speculative_algorithm", None):
        refuse.append("--speculative-algorithm")
    if getattr(server_args, "enable_mixed_chunk", False):
        refuse.append("--enable-mixed-chunk")
    if (getattr(server_args, "pp_size", 1) or 1) > 1:
        refuse.append("--pp-size > 1")
    # --tp-size N works: the ranks sum their scores before selecting (kara_sglang/tp.py).
    if (getattr(server_args, "attn_cp_size", 1) or 1) > 1:
        refuse.append("--attn-cp-size > 1")
    if getattr(server_args, "enable_hierarchical_cache", False):
        refuse.append("--enable-hierarchical-cache")
    # --enable-dp-attention works: each DP rank compresses its own requests, and scores are
    # summed over the attention-TP group only (kara_sglang/tp.py), so a rank running an idle
    # batch for the MLP's collectives never waits in a Kara collective.
    # On a decode server the radix cache and the host KV offload would store compacted rows
    # under their full token ids (their inserts do not go through release_kv_cache).
    if getattr(server_args, "disaggregation_decode_enable_radix_cache", False):
        refuse.append("--disaggregation-decode-enable-radix-cache")
    if getattr(server_args, "disaggregation_decode_enable_offload_kvcache", False):
        refuse.append("--disaggregation-decode-enable-offload-kvcache")
    if _decode_server(server_args) and not server_args.disable_overlap_schedule:
        refuse.append("overlap scheduling on a PD decode server (internal error: it should have been turned off)")
    if refuse:
        raise KaraConfigError(f"--kv-policy {config.policy}: not supported together with {', '.join(refuse)}")
    if _decode_server(server_args) and version not in sglang_versions.PD_DECODE:
        raise KaraConfigError(
            f"--kv-policy {config.policy}: on a PD decode server (--disaggregation-mode decode) "
            f"kara-sglang is verified with SGLang {', '.join(sglang_versions.PD_DECODE)} only, not {version}")
    if str(getattr(server_args, "kv_cache_dtype", "auto")).startswith("fp8") and config.policy in ("cask", "longflow"):
        raise KaraConfigError(
            f"--kv-cache-dtype: --kv-policy {config.policy} does not support an FP8 KV cache yet (cask merges "
            f"K/V entries, longflow reads V); kara, threshold and streaming do")
    if config.recall_tokens:
        check_recall(server_args, config)
    parser = getattr(server_args, "reasoning_parser", None)
    if config.scope == "reasoning" and not parser:
        raise KaraConfigError("--kara-scope: reasoning needs --reasoning-parser (it names the "
                              "end-of-thinking marker)")
    if parser and config.scope != "all" and getattr(server_args, "skip_tokenizer_init", False):
        raise KaraConfigError("--kara-scope: finding the end of reasoning needs the tokenizer; with "
                              "--skip-tokenizer-init pass --kara-scope all")


def check_recall(server_args, config) -> None:
    """Recall works per token (page size 1); its emulation (no tier, kara_sglang/recall.py)
    attends with its own kernels outside CUDA graphs, while the tier's recall buffer is filled
    inside them: what either cannot run with is refused."""
    refuse = []
    page_size = getattr(server_args, "page_size", None)
    if page_size not in (None, 1):
        refuse.append(f"--page-size {page_size} (recall selects single tokens: page size 1)")
    if not config.recall_tier_tokens and str(getattr(server_args, "device", None) or "cuda") != "cpu" \
            and not getattr(server_args, "disable_cuda_graph", False):
        refuse.append("CUDA graphs without a tier (add --disable-cuda-graph: the emulation's attention "
                      "is not graph-capturable; --kara-recall-tier-tokens is)")
    if str(getattr(server_args, "kv_cache_dtype", "auto")).startswith("fp8"):
        refuse.append("an FP8 KV cache")
    if _decode_server(server_args):
        refuse.append("--disaggregation-mode decode")
    if refuse:
        raise KaraConfigError(f"--kara-recall-tokens: not supported with {'; '.join(refuse)}")


def _policy_on(values: dict) -> bool:
    return (values.get("kv_policy") or "none") != "none"


def _decode_server(args) -> bool:
    return _is_decode(getattr(args, "disaggregation_mode", None))


def _is_decode(mode) -> bool:
    return str(mode or "null") == "decode"


def _set_values(server_args, values: dict) -> None:
    # Not SGLang's fields: they ride as one private attribute, which pickles with the
    # ServerArgs into the scheduler processes on every release (0.5.17's dataclass, which is
    # read-only once resolved; the msgspec Struct of later releases, which accepts only
    # underscore bookkeeping attributes once its input is sealed).
    try:
        setattr(server_args, FLAGS_ATTR, dict(values))
    except (AttributeError, TypeError):
        object.__setattr__(server_args, FLAGS_ATTR, dict(values))


def _take_flags(kwargs: dict, all_flags: bool) -> dict:
    """Pop the Kara keywords out of ServerArgs keyword arguments (every flag, absent ones as
    ``None``, when ``all_flags``), check the disaggregation mode, and turn overlap scheduling
    off on a PD decode server: it works with every policy (kara_sglang/adapter.py,
    OverlapView), but not yet there, where resumed requests' prebuilt batches are prepared in
    SGLang's separate decode loop."""
    values = {flag.attr: kwargs.pop(flag.attr, None) for flag in FLAGS if all_flags or flag.attr in kwargs}
    check_disaggregation(values.get("kv_policy") or "none", kwargs.get("disaggregation_mode"))
    if _policy_on(values) and _is_decode(kwargs.get("disaggregation_mode")):
        kwargs["disable_overlap_schedule"] = True
    return values


def _add_cli_args(result, parser):
    group = parser.add_argument_group("kara-sglang KV policies")
    for flag in FLAGS:
        kwargs = dict(type=flag.parse, default=None, help=flag.help)
        if flag.choices:
            kwargs["choices"] = list(flag.choices)
        if flag.attr == "kv_policy":
            kwargs["default"] = "none"
        group.add_argument(cli_name(flag), dest=flag.attr, **kwargs)
    return result


def _from_cli_args(original, cls, args, *a, **kw):
    values = {flag.attr: getattr(args, flag.attr, None) for flag in FLAGS}
    try:
        # Before SGLang resolves the arguments: its disaggregation set-up may fail first on
        # a machine without a transfer backend, hiding the real reason.
        check_disaggregation(values.get("kv_policy") or "none", getattr(args, "disaggregation_mode", None))
        if _policy_on(values) and _decode_server(args):
            args.disable_overlap_schedule = True  # see _take_flags
        server_args = original(cls, args, *a, **kw)
        _set_values(server_args, values)
        check_supported(server_args)
    except KaraConfigError as err:
        # One clear line on the command line instead of a traceback.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return server_args


def _init(original, self, *args, **kwargs):
    """``ServerArgs(kv_policy=...)`` where ServerArgs is a dataclass (0.5.17); a msgspec
    ServerArgs never calls this wrap, so :func:`engine_server_args` covers ``sglang.Engine``."""
    values = _take_flags(kwargs, all_flags=True)
    original(self, *args, **kwargs)
    if any(v is not None for v in values.values()) or getattr(self, FLAGS_ATTR, None) is None:
        _set_values(self, values)
    check_supported(self)


def engine_server_args(build):
    """``sglang.Engine(kv_policy=...)``: what ``Engine`` calls to build its ServerArgs. It takes
    the Kara keywords out, builds SGLang's ServerArgs from the rest and puts the flags on it
    before anything reads it (0.5.23's msgspec ServerArgs refuses unknown keywords)."""

    def server_args_with_flags(**kwargs):
        values = _take_flags(kwargs, all_flags=False)
        if not values:
            return build(**kwargs)
        server_args = build(**kwargs)
        _set_values(server_args, {flag.attr: values.get(flag.attr) for flag in FLAGS})
        check_supported(server_args)
        return server_args

    server_args_with_flags.kara_builds = build
    return server_args_with_flags


def install_engine_keywords() -> None:
    """Point ``Engine.server_args_class`` at :func:`engine_server_args` (plugin load).

    ``Engine.__init__`` loads the plugins and then, in the same call, builds its ServerArgs
    with ``self.server_args_class(**kwargs)``: a hook on ``Engine.__init__`` would only reach
    the second engine, and a registry hook on the class attribute would replace SGLang's
    ``ServerArgs`` class everywhere. So the one attribute is set here, on ``Engine`` only.
    """
    from sglang.srt.entrypoints.engine import Engine

    if not hasattr(Engine.server_args_class, "kara_builds"):
        # staticmethod: Engine calls it as self.server_args_class(**kwargs).
        Engine.server_args_class = staticmethod(engine_server_args(Engine.server_args_class))


PATCHES = (
    Patch("sglang.srt.server_args.ServerArgs.add_cli_args", "AFTER", _add_cli_args),
    Patch("sglang.srt.server_args.ServerArgs.from_cli_args", "AROUND", _from_cli_args),
    Patch("sglang.srt.server_args.ServerArgs.__init__", "AROUND", _init),
)
