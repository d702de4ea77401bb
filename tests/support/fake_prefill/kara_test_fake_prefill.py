"""Test-only SGLang plugin: the prefill half of a PD pair, faked with deterministic prompt KV.

A decode server with ``--disaggregation-transfer-backend fake`` never receives prompt KV: its
prompt slots keep whatever the pool held, so outputs would depend on slot reuse. With this
plugin on ``PYTHONPATH`` (it registers through SGLang's plugin entry points), every slot a
decode server pre-allocates for a prompt gets K and V looked up from fixed random tables by
token id, so the same prompt always sees the same KV, whatever slots it lands in. A resumed
retraction's slots are written too and then overwritten by SGLang's copy back from the host.
"""

import torch

TABLE_ROWS = 1024  # token ids are folded into this many table rows
_tables = {}


def _table(layer: int, which: str, shape, dtype, device) -> torch.Tensor:
    key = (layer, which, tuple(shape), dtype, str(device))
    if key not in _tables:
        gen = torch.Generator().manual_seed(1000 * layer + (0 if which == "k" else 1))
        _tables[key] = torch.randn((TABLE_ROWS, *shape), generator=gen).to(device, dtype)
    return _tables[key]


def _write_prompt_kv(kv_loc, queue, req, *args, **kwargs):
    if kv_loc is None or kv_loc.numel() == 0:
        return kv_loc
    pool = queue.token_to_kv_pool_allocator.get_kvcache()
    n = min(len(req.origin_input_ids), kv_loc.numel())
    ids = torch.tensor(list(req.origin_input_ids[:n]), dtype=torch.int64) % TABLE_ROWS
    slots = kv_loc[:n].to(torch.int64)
    for layer, (k, v) in enumerate(zip(pool.k_buffer, pool.v_buffer)):
        k[slots] = _table(layer, "k", k.shape[1:], k.dtype, k.device)[ids.to(k.device)]
        v[slots] = _table(layer, "v", v.shape[1:], v.dtype, v.device)[ids.to(v.device)]
    return kv_loc


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.disaggregation.decode.DecodePreallocQueue._pre_alloc",
                          _write_prompt_kv, HookType.AFTER)
