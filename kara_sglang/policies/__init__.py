"""KV policies by ``--kv-policy`` name."""

from kara_sglang.config import KaraConfig
from kara_sglang.policies.base import KVPolicy, NoCompression
from kara_sglang.policies.cask import CaskPolicy
from kara_sglang.policies.kara import KaraPolicy
from kara_sglang.policies.longflow import LongFlowPolicy
from kara_sglang.policies.streaming import StreamingPolicy
from kara_sglang.policies.threshold import ThresholdPolicy

POLICIES = {cls.name: cls for cls in (NoCompression, KaraPolicy, StreamingPolicy, ThresholdPolicy, CaskPolicy,
                                      LongFlowPolicy)}


def make_policy(config: KaraConfig) -> KVPolicy:
    """The policy named by ``config.policy`` (the config is already validated)."""
    return POLICIES[config.policy](config)


__all__ = ["KVPolicy", "POLICIES", "make_policy"]
