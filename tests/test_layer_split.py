"""Layer-split models (issue 24, item 2): with ``device_map`` over several devices, each layer's KV pools and
the forward's metadata live on that layer's device.

The CPU tests check the placement (which device each cache layer reads from the model's hooks and
parameters), the per-device copies of a forward's context and the per-device KV sizing, with ``meta`` as the
second device (no second real device here). The ``gpu`` tests run a real split: a tiny Llama with layer 0 on
cuda:0 and layer 1 on the CPU (accelerate's ``dispatch_model`` with ``main_device="cpu"``, so the CPU layers
run on the CPU), and, with two GPUs, a split over cuda:0 and cuda:1; both against stock generate() on the same
split model (a divergence only at a near-tie, as in tests/test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook, add_hook_to_module

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.cache.paged_cache import ForwardContext, PagedKVCache
from hf_turbo.engine.memory import layer_devices, split_kv_blocks
from hf_turbo.eval.exactness import explain_divergence
from hf_turbo.testing import tiny_model

META = torch.device("meta")
CPU = torch.device("cpu")


def test_layer_devices_come_from_hooks_and_parameters():
    model = tiny_model("llama")  # 2 layers
    assert layer_devices(model) is None  # not split: the engine's one device
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 1}
    assert layer_devices(model) == [CPU, CPU]  # parameters' device where no hook says otherwise
    add_hook_to_module(model.model.layers[1], AlignDevicesHook(execution_device="meta"))
    assert layer_devices(model) == [CPU, META]  # an accelerate hook's execution device wins (found on an ancestor)
    model.model.layers[0].to("meta")  # offloaded weights: unknown until the first forward
    assert layer_devices(model) == [None, META]


def test_pools_and_context_per_device():
    cache = PagedKVCache(8, 4, 2, torch.float32, CPU, kv_shape=(2, 8), layer_devices=[CPU, META])
    assert [cache.layer_pools(i)[0].device for i in range(2)] == [CPU, META]
    assert [cache.layer_pools(i)[1].device for i in range(2)] == [CPU, META]
    lens = [3, 5]
    ctx = ForwardContext(cache=cache, slot_mapping=torch.tensor([0, 1, 2, 4, 5, 6, 7, 8], dtype=torch.int64),
                         cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int32),
                         context_lens=torch.tensor(lens, dtype=torch.int32),
                         block_tables=torch.tensor([[0, 0], [1, 2]], dtype=torch.int32), max_seqlen_q=5,
                         max_context_len=5, host_cu_seqlens_q=[0, 3, 8], host_context_lens=lens, backend=cache.backend)
    assert ctx.on(CPU) is ctx
    other = ctx.on(META)
    assert other is ctx.on(META)  # copied once per forward
    for name in ("slot_mapping", "cu_seqlens_q", "context_lens", "block_tables"):
        assert getattr(other, name).device == META and getattr(other, name).shape == getattr(ctx, name).shape
    assert other.backend.name == "reference"  # a CPU backend cannot run there: the reference backend can
    assert other.cache is cache and other.host_context_lens == lens
    # a layer whose keys arrive on another device than its pools were made on gets pools there
    cache.ctx = ctx
    key = torch.zeros(1, 2, 8, 8, device=META)
    cache.update(key, key, 0)
    assert cache.layer_pools(0)[0].device == META and ctx.last_write[0] == 0


def test_split_kv_sizing_counts_each_devices_own_layers():
    a, b = torch.device("cuda", 0), torch.device("cuda", 1)
    per_block = 4_000  # bytes for all 4 layers
    # 3 layers on a (3,000 bytes a block), 1 on b (1,000)
    assert split_kv_blocks({a: 9_000_000, b: 9_000_000}, [a, a, a, b], per_block) == 3_000
    assert split_kv_blocks({a: 9_000_000, b: 2_000_000}, [a, a, a, b], per_block) == 2_000
    # a layer of unknown device may land on either: counted on both
    assert split_kv_blocks({a: 9_000_000, b: 9_000_000}, [a, a, None, b], per_block) == 3_000
    assert split_kv_blocks({a: 8_000_000, b: 8_000_000}, [a, a, b, b], per_block) == 4_000


def test_offloaded_layer_runs_exactly(tmp_path):
    """accelerate's disk offload (the hooks load a layer's weights for each call): the engine places that layer's
    pools at its first forward and equals stock generate() on the same model, with chunked prefill."""
    model = tiny_model("llama")
    prompts = [[5, 17, 3, 99, 42, 7, 250, 11, 60], [300, 2, 8], list(range(40, 75))]
    stock = [model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
             for p in prompts]
    model = dispatch_model(model, device_map={"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                                              "model.layers.0": "cpu", "model.layers.1": "disk",
                                              "model.norm": "cpu", "lm_head": "cpu"},
                           main_device="cpu", offload_dir=str(tmp_path))
    assert next(model.model.layers[1].parameters()).device == META  # offloaded: loaded per call by its hook
    engine = Engine(model, config=hf_turbo.TurboConfig(max_num_batched_tokens=16))
    try:
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=16), use_tqdm=False)
        assert [o.token_ids for o in outs] == stock
        assert [engine.cache.layer_pools(i)[0].device for i in range(2)] == [CPU, CPU]
        engine.check_invariants()
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.close()


def _split_check(device_map: dict, main_device: str) -> None:
    model = tiny_model("llama")
    model = dispatch_model(model, device_map=device_map, main_device=main_device)
    devices = layer_devices(model)
    assert len(set(devices)) == 2, devices
    prompts = [[5, 17, 3, 99, 42, 7, 250, 11, 60], [300, 2, 8], list(range(40, 75))]
    first = next(model.parameters()).device
    stock = [model.generate(torch.tensor([p], device=first), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
             for p in prompts]
    engine = Engine(model, config=hf_turbo.TurboConfig(max_num_batched_tokens=16))  # chunked prefill too
    try:
        assert [engine.cache.layer_pools(i)[0].device for i in range(2)] == devices
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=16), use_tqdm=False)
        for row, (p, s, o) in enumerate(zip(prompts, stock, outs)):
            div = explain_divergence(model, p, s, o.token_ids, row)
            assert div is None or div.near_tie, div
        engine.check_invariants()
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.close()


@pytest.mark.gpu
def test_split_over_a_gpu_and_the_cpu():
    _split_check({"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}, main_device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_split_over_two_gpus():
    _split_check({"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}, main_device="cuda:0")
