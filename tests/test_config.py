import pytest

from kara_sglang.config import KaraConfig, KaraConfigError


def test_defaults_match_the_paper_settings():
    cfg = KaraConfig()
    assert (cfg.window, cfg.buffer, cfg.chunk_size) == (512, 64, 8)
    assert cfg.window_budget == 128  # 25% of W
    assert cfg.num_chunks == 8  # half the budget in chunks of 8


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(policy="snapkv"), "--kv-policy"),
        (dict(window=1), "--kara-window"),
        (dict(window=2048), "--kara-window"),
        (dict(buffer=0), "--kara-buffer"),
        (dict(window=64, buffer=64), "--kara-buffer"),
        (dict(window=64, buffer=80), "--kara-buffer"),
        (dict(keep_ratio=0.0), "--kara-keep-ratio"),
        (dict(keep_ratio=1.5), "--kara-keep-ratio"),
        (dict(keep_ratio=-0.1), "--kara-keep-ratio"),
        (dict(budget=0), "--kara-budget"),
        (dict(budget=600), "--kara-budget"),
        (dict(chunk_size=0), "--kara-chunk-size"),
        (dict(chunk_fraction=1.2), "--kara-chunk-fraction"),
        (dict(chunk_fraction=-0.5), "--kara-chunk-fraction"),
        # budget 4 cannot hold half-budget chunks of 8
        (dict(window=16, buffer=4, keep_ratio=0.25, chunk_size=8), "--kara-chunk-size"),
        (dict(vote_heads="some"), "--kara-vote-heads"),
        (dict(vote_layers=()), "--kara-vote-layers"),
        (dict(vote_layers=(-1,)), "--kara-vote-layers"),
        (dict(num_vote_layers=0), "--kara-num-vote-layers"),
        (dict(sink=-1), "--kara-sink"),
        (dict(scope="thinking"), "--kara-scope"),
        (dict(policy="streaming"), "--kara-budget"),
        (dict(policy="threshold"), "--kara-budget"),
        (dict(policy="threshold", budget=32, buffer=64), "--kara-budget"),
        (dict(policy="streaming", budget=4, sink=4), "--kara-sink"),
    ],
)
def test_invalid_settings_are_refused_with_the_flag_named(kwargs, flag):
    with pytest.raises(KaraConfigError) as err:
        KaraConfig(**kwargs)
    message = str(err.value)
    assert message.startswith(flag + ":")
    assert "\n" not in message


def test_budget_overrides_keep_ratio():
    assert KaraConfig(budget=100, keep_ratio=0.9).window_budget == 100


def test_vote_layers_default_is_spread_and_includes_last():
    cfg = KaraConfig(num_vote_layers=4)
    assert cfg.resolve_vote_layers(32) == (7, 15, 23, 31)
    assert cfg.resolve_vote_layers(2) == (0, 1)


def test_vote_layers_out_of_range_is_refused():
    with pytest.raises(KaraConfigError, match="--kara-vote-layers"):
        KaraConfig(vote_layers=(0, 40)).resolve_vote_layers(32)


def test_overrides_are_validated():
    cfg = KaraConfig()
    assert cfg.with_overrides(keep_ratio=0.5).window_budget == 256
    with pytest.raises(KaraConfigError, match="--kara-keep-ratio"):
        cfg.with_overrides(keep_ratio=2.0)


def test_a_flag_counts_as_given_only_when_set():
    """What lets a default follow the model (U on hybrid sliding-window pools) while a value
    the user gave is kept: ``flags.given`` on ServerArgs' carried values and on a namespace."""
    from types import SimpleNamespace

    from kara_sglang.flags import FLAGS_ATTR, given

    assert given(SimpleNamespace(**{FLAGS_ATTR: {"kara_buffer": 64}}), "kara_buffer")
    assert not given(SimpleNamespace(**{FLAGS_ATTR: {"kara_buffer": None}}), "kara_buffer")
    assert not given(SimpleNamespace(**{FLAGS_ATTR: {}}), "kara_buffer")
    assert given(SimpleNamespace(kara_buffer=32), "kara_buffer")
    assert not given(SimpleNamespace(kara_window=32), "kara_buffer")
