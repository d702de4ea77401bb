"""Configuration of the KV policies, validated once at start-up.

Every invalid combination raises :class:`KaraConfigError` with one line that names the
offending setting (the same name as its ``--kara-*`` flag), so a server refuses to start
instead of failing on the first long request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Tuple

POLICY_NAMES = ("none", "kara", "streaming", "threshold", "cask", "longflow")
VOTE_HEAD_MODES = ("group", "all")
SCOPES = ("auto", "reasoning", "all")
RECALL_DIGESTS = ("exact", "bits2", "bits3", "bits4")  # kara_sglang.recall
RECALL_KV = ("exact", "bits2", "bits3", "bits4", "bits8")
RECALL_TIER_KV = ("bits2", "bits4", "bits8")  # what the GPU tier packs (kara_sglang.recall_tier)

# The window size the scorer kernel is tuned and tested for.
MAX_WINDOW = 1024

# Policies that compress the decode tail window by window (W + U trigger, budget per window).
WINDOW_POLICIES = ("kara", "cask")
# Policies that hold the whole decode cache to a budget (budget + U trigger, --kara-budget required).
DECODE_CACHE_POLICIES = ("streaming", "threshold", "longflow")


class KaraConfigError(ValueError):
    """A KV-policy setting that cannot work; the message names the flag."""


def check_custom_params(custom_params: object) -> None:
    """A request's ``custom_params`` reach the plugin as the client sent them: anything but a
    JSON object (e.g. a string) is refused with one line rather than read as one."""
    if not isinstance(custom_params, Mapping):
        raise KaraConfigError(f"custom_params: must be an object of settings, not {type(custom_params).__name__}")


@dataclass(frozen=True)
class KaraConfig:
    """Settings of the KV policies (``--kv-policy`` and the ``--kara-*`` flags).

    Kara: once a request's uncompressed decode tail holds ``window + buffer`` tokens, its
    oldest ``window`` tokens are scored and shrunk to ``budget`` tokens; the newest
    ``buffer`` tokens stay and open the next window.

    Attributes:
        policy: one of ``POLICY_NAMES``.
        window: W, tokens compressed at once.
        buffer: U, newest tokens left uncompressed (they also vote as queries).
        keep_ratio: fraction of W kept; ignored when ``budget`` is given.
        budget: tokens kept per window (Kara) or per decode cache (threshold, streaming,
            longflow).
            ``None`` means ``round(keep_ratio * window)``.
        chunk_size: gamma, the longest contiguous chunk Token2Chunk grows (1 disables it).
        chunk_fraction: share of the budget spent on chunks; the rest goes to single
            top-scoring tokens.
        core_fraction: cask only: share of each window's budget kept exactly (the core);
            the rest of the budget holds merged scratch entries.
        vote_layers: layer ids whose queries vote; ``None`` means ``num_vote_layers``
            layers spread evenly over the model, the last one included.
        num_vote_layers: how many layers vote when ``vote_layers`` is ``None``.
        vote_heads: ``"group"`` stores one query per KV head (the mean of its GQA group's
            query heads: GQA-ratio times less buffer memory); ``"all"`` stores every query head.
        sink: streaming only: first decode tokens always kept.
        scope: what may be compressed: ``"reasoning"`` only the thinking segment (up to
            the end-of-thinking marker of the server's ``--reasoning-parser``), ``"all"``
            every decoded token, ``"auto"`` reasoning when a parser is set, else all.
        recall_tokens: kara only: evicted tokens each decode step attends to again, per layer
            and KV head, chosen by its query (0 = off; ``kara_sglang.recall``, an emulation:
            evicted slots stay allocated).
        recall_digest: what ranks the evicted tokens: ``exact`` keys or ``bits2/3/4`` keys.
        recall_lag: 0 ranks with the step's own query, 1 with the previous step's.
        recall_kv: the recalled tokens' K and V as attended: ``exact``, or ``bits2/3/4/8``.
        recall_tier_tokens: 0 (default): the emulation holds evicted slots in SGLang's pool;
            N > 0: evicted K and V move into a GPU tier of N tokens at ``recall_kv`` bits and
            their pool slots are freed (``kara_sglang.recall_tier``).
        recall_pages: with a tier: 0 (default) ranks every tier token each step; N > 0 ranks
            16-token pages by their key bounds first and then only the tokens of the best N
            pages (two stages, kernels/recall_pages.py; N * 16 must cover recall_tokens;
            N * 16 == recall_tokens recalls the N pages' tokens without ranking them).
        recall_horizon: with a tier: 0 (default) keeps every evicted token a request stores
            until it ends; H > 0 keeps only each request's last H evicted tokens: storing a
            window drops the request's oldest tier tokens (whole 16-token pages) first, and
            those are gone as without recall. Must hold a whole window and the recall buffer.
    """

    policy: str = "kara"
    window: int = 512
    buffer: int = 64
    keep_ratio: float = 0.25
    budget: Optional[int] = None
    chunk_size: int = 8
    chunk_fraction: float = 0.5
    core_fraction: float = 0.5
    vote_layers: Optional[Tuple[int, ...]] = None
    num_vote_layers: int = 4
    vote_heads: str = "group"
    sink: int = 4
    scope: str = "auto"
    recall_tokens: int = 0
    recall_digest: str = "exact"
    recall_lag: int = 0
    recall_kv: str = "exact"
    recall_tier_tokens: int = 0
    recall_pages: int = 0
    recall_horizon: int = 0

    def __post_init__(self) -> None:
        if self.vote_layers is not None:
            object.__setattr__(self, "vote_layers", tuple(int(x) for x in self.vote_layers))
        self._validate()

    # ----------------------------------------------------------------- derived values
    @property
    def window_budget(self) -> int:
        """Tokens kept out of each compressed window (Kara) or kept in total (others)."""
        if self.budget is not None:
            return self.budget
        return max(1, int(round(self.keep_ratio * self.window)))

    @property
    def num_chunks(self) -> int:
        """Chunk seeds per window: as many full chunks as the chunk share of the budget holds."""
        if self.chunk_size <= 1:
            return 0
        return int(math.floor(self.chunk_fraction * self.window_budget / self.chunk_size))

    def resolve_vote_layers(self, num_layers: int) -> Tuple[int, ...]:
        """Layer ids that vote in a model with ``num_layers`` layers."""
        if self.vote_layers is not None:
            bad = [i for i in self.vote_layers if not 0 <= i < num_layers]
            if bad:
                raise KaraConfigError(
                    f"--kara-vote-layers: layers {bad} do not exist in a {num_layers}-layer model"
                )
            return tuple(sorted(set(self.vote_layers)))
        n = min(self.num_vote_layers, num_layers)
        # Evenly spaced, ending at the last layer: late layers carry the most task-specific
        # attention, early ones the most positional.
        step = num_layers / n
        return tuple(sorted({num_layers - 1 - int(i * step) for i in range(n)}))

    def with_overrides(self, **changes) -> "KaraConfig":
        """A validated copy with some settings changed (per-request overrides)."""
        return replace(self, **changes)

    # ------------------------------------------------------------------- validation
    def _validate(self) -> None:
        def fail(flag: str, why: str) -> None:
            raise KaraConfigError(f"--{flag}: {why}")

        if self.policy not in POLICY_NAMES:
            fail("kv-policy", f"unknown policy {self.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        if not isinstance(self.window, int) or self.window < 2:
            fail("kara-window", f"must be an integer >= 2, got {self.window!r}")
        if self.policy in WINDOW_POLICIES and self.window > MAX_WINDOW:
            fail("kara-window", f"must be <= {MAX_WINDOW}, got {self.window}")
        if not isinstance(self.buffer, int) or self.buffer < 1:
            fail("kara-buffer", f"must be an integer >= 1, got {self.buffer!r}")
        if self.buffer >= self.window:
            fail("kara-buffer", f"buffer U={self.buffer} must be smaller than window W={self.window}")
        if not (isinstance(self.keep_ratio, (int, float)) and 0.0 < self.keep_ratio <= 1.0):
            fail("kara-keep-ratio", f"must be in (0, 1], got {self.keep_ratio!r}")
        if self.budget is not None:
            if not isinstance(self.budget, int) or self.budget < 1:
                fail("kara-budget", f"must be an integer >= 1, got {self.budget!r}")
            if self.policy in WINDOW_POLICIES and self.budget > self.window:
                fail("kara-budget", f"budget {self.budget} exceeds window W={self.window}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            fail("kara-chunk-size", f"gamma must be an integer >= 1, got {self.chunk_size!r}")
        if not (isinstance(self.chunk_fraction, (int, float)) and 0.0 <= self.chunk_fraction <= 1.0):
            fail("kara-chunk-fraction", f"must be in [0, 1], got {self.chunk_fraction!r}")
        if not (isinstance(self.core_fraction, (int, float)) and not isinstance(self.core_fraction, bool)
                and 0.0 <= self.core_fraction <= 1.0):
            fail("kara-core-fraction", f"must be in [0, 1], got {self.core_fraction!r}")
        if self.policy == "kara" and self.chunk_size > 1 and self.chunk_fraction > 0 and self.num_chunks < 1:
            fail(
                "kara-chunk-size",
                f"the chunk share of the budget ({self.chunk_fraction} x {self.window_budget} tokens) "
                f"cannot hold one chunk of gamma={self.chunk_size} tokens; lower gamma or "
                f"--kara-chunk-fraction, or raise the budget",
            )
        if self.vote_heads not in VOTE_HEAD_MODES:
            fail("kara-vote-heads", f"must be one of {VOTE_HEAD_MODES}, got {self.vote_heads!r}")
        if self.vote_layers is not None and (
            len(self.vote_layers) == 0 or any(i < 0 for i in self.vote_layers)
        ):
            fail("kara-vote-layers", f"must be a non-empty list of layer ids >= 0, got {self.vote_layers!r}")
        if not isinstance(self.num_vote_layers, int) or self.num_vote_layers < 1:
            fail("kara-num-vote-layers", f"must be an integer >= 1, got {self.num_vote_layers!r}")
        if self.scope not in SCOPES:
            fail("kara-scope", f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if not isinstance(self.sink, int) or self.sink < 0:
            fail("kara-sink", f"must be an integer >= 0, got {self.sink!r}")
        if isinstance(self.recall_tokens, bool) or not isinstance(self.recall_tokens, int) or self.recall_tokens < 0:
            fail("kara-recall-tokens", f"must be an integer >= 0, got {self.recall_tokens!r}")
        if self.recall_tokens and self.policy != "kara":
            fail("kara-recall-tokens", f"recall is built for the kara policy, not {self.policy}")
        if self.recall_digest not in RECALL_DIGESTS:
            fail("kara-recall-digest", f"must be one of {', '.join(RECALL_DIGESTS)}, got {self.recall_digest!r}")
        if self.recall_lag not in (0, 1) or isinstance(self.recall_lag, bool):
            fail("kara-recall-lag", f"must be 0 or 1, got {self.recall_lag!r}")
        if self.recall_kv not in RECALL_KV:
            fail("kara-recall-kv", f"must be one of {', '.join(RECALL_KV)}, got {self.recall_kv!r}")
        tier = self.recall_tier_tokens
        if isinstance(tier, bool) or not isinstance(tier, int) or tier < 0:
            fail("kara-recall-tier-tokens", f"must be an integer >= 0, got {tier!r}")
        if tier and not self.recall_tokens:
            fail("kara-recall-tier-tokens", "the tier holds evicted KV for recall: set --kara-recall-tokens too")
        if tier and self.recall_kv not in RECALL_TIER_KV:
            fail("kara-recall-tier-tokens", f"the tier stores K and V at --kara-recall-kv bits "
                 f"({', '.join(RECALL_TIER_KV)}), got {self.recall_kv}")
        pages = self.recall_pages
        if isinstance(pages, bool) or not isinstance(pages, int) or pages < 0:
            fail("kara-recall-pages", f"must be an integer >= 0, got {pages!r}")
        if pages and not tier:
            fail("kara-recall-pages", "two-stage ranking ranks the tier's pages: set --kara-recall-tier-tokens too")
        if pages and pages * 16 < self.recall_tokens:
            fail("kara-recall-pages", f"{pages} pages of 16 tokens hold fewer than the "
                 f"{self.recall_tokens} recalled tokens (--kara-recall-tokens)")
        horizon = self.recall_horizon
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 0:
            fail("kara-recall-horizon", f"must be an integer >= 0, got {horizon!r}")
        if horizon and not tier:
            fail("kara-recall-horizon", "the horizon bounds the tier: set --kara-recall-tier-tokens too")
        if horizon and horizon < max(self.window, self.recall_tokens):
            fail("kara-recall-horizon", f"{horizon} tokens hold neither a whole window ({self.window}) "
                 f"nor the recall buffer ({self.recall_tokens}); use at least {max(self.window, self.recall_tokens)}")
        if tier and self.recall_digest != "exact":
            fail("kara-recall-tier-tokens", "tier tokens are ranked by the tier's own keys: leave "
                 f"--kara-recall-digest at exact, got {self.recall_digest}")
        if self.policy in DECODE_CACHE_POLICIES and self.budget is None:
            fail("kara-budget", f"the {self.policy} policy needs a decode-cache budget in tokens")
        if self.policy == "streaming" and self.sink >= self.window_budget:
            fail("kara-sink", f"sink {self.sink} must be smaller than the budget {self.window_budget}")
        if self.policy in ("threshold", "longflow") and self.window_budget <= self.buffer:
            fail(
                "kara-budget",
                f"{self.policy} policy keeps the last U={self.buffer} tokens (never evicted), "
                f"so its budget must exceed U (got {self.window_budget})",
            )
