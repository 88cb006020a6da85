"""The torch.library custom ops behind stopkit.ops: ``torch.library.opcheck`` of each (schema and
mutation annotations, fake implementation, AOT dispatch with dynamic shapes) across dtypes and the
paged-attention variants, and ``torch.compile(fullgraph=True)`` of functions calling the public
ops against eager, including the index checks that run inside the ops."""

from __future__ import annotations

import pytest
import torch

from stopkit import ops, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VARIANTS = ("plain", "suffix", "sinks", "window", "lse", "all")


def _attention_inputs(
    dtype: torch.dtype,
    device,
    *,
    B: int = 3,
    S: int = 2,
    H: int = 4,
    Hkv: int = 2,
    D: int = 64,
    bs: int = 16,
) -> dict:
    """Random caches (every block filled), a shuffled block table, ragged lengths (0 included)."""
    lens = [5, 0, 40][:B]
    per_row = 3
    num_blocks = B * per_row + 2
    table = torch.randperm(num_blocks)[: B * per_row].view(B, per_row).to(torch.int32)
    randn = lambda *shape: torch.randn(*shape).to(dtype).to(device)  # noqa: E731
    return dict(
        q=randn(B, S, H, D),
        k_cache=randn(num_blocks, bs, Hkv, D),
        v_cache=randn(num_blocks, bs, Hkv, D),
        block_table=table.to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        suffix_k=randn(B, S, Hkv, D),
        suffix_v=randn(B, S, Hkv, D),
        sinks=torch.randn(H, device=device),
    )


def _variant_kwargs(variant: str, x: dict) -> dict:
    """The public function's keyword arguments of one variant (of inputs ``x``)."""
    kw = {k: x[k] for k in ("q", "k_cache", "v_cache", "block_table", "seq_lens")}
    if variant in ("suffix", "all"):
        kw.update(suffix_k=x["suffix_k"], suffix_v=x["suffix_v"])
    if variant in ("sinks", "all"):
        kw["sinks"] = x["sinks"]
    if variant in ("window", "all"):
        kw["window"] = 7
    if variant in ("lse", "all"):
        kw["return_lse"] = True
    return kw


def _op_args(kw: dict, *, check_indices: bool = True) -> tuple:
    """The custom op's positional arguments for the public function's keyword arguments ``kw``."""
    return (
        kw["q"],
        kw["k_cache"],
        kw["v_cache"],
        kw["block_table"],
        kw["seq_lens"],
        kw.get("suffix_k"),
        kw.get("suffix_v"),
        kw.get("sinks"),
        kw["q"].shape[-1] ** -0.5,
        kw.get("window", 0),
        -1,
        kw.get("return_lse", False),
        check_indices,
    )


def _close(got, want, dtype: torch.dtype) -> None:
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for g, w in zip(
        got if isinstance(got, tuple) else (got,),
        want if isinstance(want, tuple) else (want,),
        strict=True,
    ):
        torch.testing.assert_close(g.float(), w.float(), **tol)


# ---- opcheck ----


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_paged_attention(device, dtype, variant):
    kw = _variant_kwargs(variant, _attention_inputs(dtype, device))
    torch.library.opcheck(torch.ops.stopkit.paged_attention.default, _op_args(kw))
    out, lse = torch.ops.stopkit.paged_attention(*_op_args(kw))
    assert (
        (lse.shape == (3, 2, 4) and lse.dtype == torch.float32)
        if kw.get("return_lse")
        else lse is None
    )
    want = reference.paged_attention(**kw)
    _close((out, lse) if kw.get("return_lse") else out, want, dtype)


def _write_inputs(dtype: torch.dtype, device, T: int = 9) -> tuple:
    slots = torch.randperm(6 * 8)[:T]
    slots[::3] = -1
    k, v = (torch.randn(T, 2, 32).to(dtype).to(device) for _ in range(2))
    k_cache, v_cache = (torch.randn(6, 8, 2, 32).to(dtype).to(device) for _ in range(2))
    return k, v, k_cache, v_cache, slots.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_write_kv(device, dtype):
    k, v, k_cache, v_cache, slots = _write_inputs(dtype, device)
    for check in (True, False):
        torch.library.opcheck(
            torch.ops.stopkit.write_kv.default, (k, v, k_cache, v_cache, slots, check)
        )
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(k, v, want_k, want_v, slots)
    torch.ops.stopkit.write_kv(k, v, k_cache, v_cache, slots, True)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("dtype", DTYPES + (torch.uint8,), ids=str)
def test_opcheck_copy_blocks(device, dtype):
    cache = torch.randint(0, 100, (3, 2, 10, 8, 2, 16)).to(dtype).to(device)
    src, dst = torch.tensor([1, 4, 1], device=device), torch.tensor([0, 9, 2], device=device)
    torch.library.opcheck(torch.ops.stopkit.copy_blocks.default, (cache, src, dst, 2))
    want = cache.clone()
    reference.copy_blocks(want, src, dst)
    torch.ops.stopkit.copy_blocks(cache, src, dst, 2)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("layer", [False, True], ids=["head", "hidden-layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_stop_score(device, dtype, layer):
    w = lambda *shape: (torch.randn(*shape) / 4).to(dtype).to(device)  # noqa: E731
    hidden = 3 * torch.randn(5, 48, device=device).to(dtype)
    h = 24 if layer else 0
    args = (
        hidden,
        w(2, h or 48),
        w(2),
        1 + w(48),
        w(h, 48) if layer else None,
        w(h) if layer else None,
        1e-6,
        3,
    )
    torch.library.opcheck(torch.ops.stopkit.stop_score.default, args)
    want = reference.stop_score(
        hidden.double(),
        args[1].double(),
        args[2].double(),
        norm_weight=args[3].double(),
        eps=1e-6,
        hidden_weight=args[4].double() if layer else None,
        hidden_bias=args[5].double() if layer else None,
        activation="silu",
    )
    torch.testing.assert_close(
        torch.ops.stopkit.stop_score(*args).double(), want, rtol=1e-5, atol=1e-6
    )


# ---- torch.compile(fullgraph=True) through the public functions ----


def _compiled(fn, backend: str = "aot_eager"):
    """``fn`` compiled in one graph. aot_eager traces Dynamo, the fake kernels and AOTAutograd's
    functionalization of the mutating ops in seconds; one test below runs inductor itself."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compile_paged_attention(device, variant):
    x = _attention_inputs(torch.float32, device)
    kw = _variant_kwargs(variant, x)
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    options = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}

    def fn(**t):  # work on both sides of the op, so that it sits inside a graph
        out = ops.paged_attention(
            **{**t, "q": t["q"] * 2}, **options, check_indices=False, max_seq_len=40
        )
        return (out[0] + 1, out[1]) if isinstance(out, tuple) else out + 1

    _close(_compiled(fn)(**tensors), fn(**tensors), torch.float32)


def test_compile_write_kv_and_copy_blocks_mutate_the_cache(device):
    """A whole PagedKVCache-like storage in, views of it written inside the graph: the storage
    afterwards equals eager's."""
    storage = torch.randn(2, 2, 6, 8, 2, 32, device=device)
    k, v, _, _, slots = _write_inputs(torch.float32, device)
    src, dst = torch.tensor([1, 3], device=device), torch.tensor([0, 5], device=device)

    def fn(storage, k, v, slots, src, dst):
        for layer in range(storage.shape[0]):
            ops.write_kv(
                k + layer, v, storage[layer, 0], storage[layer, 1], slots, check_indices=False
            )
        ops.copy_blocks(storage, src, dst)
        return storage.sum()

    want_storage = storage.clone()
    want = fn(want_storage, k, v, slots, src, dst)
    got = _compiled(fn)(storage, k, v, slots, src, dst)
    assert torch.equal(storage, want_storage)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compile_stop_score(device, dtype):
    hidden = torch.randn(5, 48, device=device).to(dtype)
    weights = dict(
        head_weight=torch.randn(2, 24, device=device).to(dtype),
        hidden_weight=torch.randn(24, 48, device=device).to(dtype) / 7,
        norm_weight=torch.randn(48, device=device).to(dtype),
    )

    def fn(hidden, **w):
        return ops.stop_score(hidden * 2, **w, activation="tanh") * 3

    torch.testing.assert_close(_compiled(fn)(hidden, **weights), fn(hidden, **weights))


def test_compile_inductor_runs_every_op(device):
    """One function calling all four ops, compiled by inductor: equal to eager, and the cache
    storage is written in place (no copy of it per call)."""
    from torch._inductor.utils import run_and_get_code

    x = _attention_inputs(torch.float32, device)
    storage = torch.randn(1, 2, *x["k_cache"].shape, device=device)
    k, v = (torch.randn(3, 2, 64, device=device) for _ in range(2))
    slots = torch.tensor([3, -1, 17], device=device)
    head = dict(
        head_weight=torch.randn(2, 64, device=device), norm_weight=torch.randn(64, device=device)
    )

    def fn(storage, q, k, v, slots, block_table, seq_lens, sinks):
        ops.write_kv(k, v, storage[0, 0], storage[0, 1], slots, check_indices=False)
        ops.copy_blocks(storage, block_table[0, :1].long(), block_table[2, :1].long())
        out, lse = ops.paged_attention(
            q,
            storage[0, 0],
            storage[0, 1],
            block_table,
            seq_lens,
            sinks=sinks,
            window=9,
            return_lse=True,
            check_indices=False,
        )
        return ops.stop_score(out.flatten(0, 2), **head), lse.exp()

    args = (x["q"], k, v, slots, x["block_table"], x["seq_lens"], x["sinks"])
    want_storage = storage.clone()
    want = fn(want_storage, *args)
    got, code = run_and_get_code(_compiled(fn, "inductor"), storage, *args)
    numel = str(storage.numel())
    assert not any(f"({numel}, )" in c for c in code), "inductor copies the cache storage"
    _close(got, want, torch.float32)
    assert torch.equal(storage, want_storage)


@pytest.mark.parametrize("op", ["paged_attention", "write_kv", "copy_blocks"])
def test_compiled_index_checks_still_raise(device, op):
    """check_indices=True (and copy_blocks' checks) run inside the ops on the real data, so a
    compiled caller gets the same ValueError as eager, and nothing is written."""
    x = _attention_inputs(torch.float32, device)
    k, v, k_cache, v_cache, slots = _write_inputs(torch.float32, device)
    calls = {
        "paged_attention": (
            lambda lens: (
                ops.paged_attention(x["q"], x["k_cache"], x["v_cache"], x["block_table"], lens) + 1
            ),
            x["seq_lens"],
            x["seq_lens"] + 100,
            "seq_lens must be <=",
        ),
        "write_kv": (
            lambda s: ops.write_kv(k * 1, v, k_cache, v_cache, s),
            slots,
            slots.clone().fill_(5),
            "must not repeat a slot",
        ),
        "copy_blocks": (
            lambda d: ops.copy_blocks(k_cache, d - 1, d),
            torch.tensor([2, 4], device=device),
            torch.tensor([2, 40], device=device),
            r"src and dst must lie in \[0, 6\)",
        ),
    }
    fn, good, bad, message = calls[op]
    compiled = _compiled(fn)
    compiled(good)
    before = (k_cache.clone(), v_cache.clone())
    with pytest.raises(ValueError, match=message):
        compiled(bad)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_export_decode_layer(device):
    """torch.export of a module that writes the step's keys and values into the cache storage and
    attends over it: the exported program holds the custom ops (one graph, the storage a mutated
    input), and running it equals eager on fresh inputs with another batch size."""
    from torch.export import Dim

    class Layer(torch.nn.Module):
        def forward(self, storage, q, k, v, slots, block_table, seq_lens):
            ops.write_kv(k, v, storage[0], storage[1], slots, check_indices=False)
            return ops.paged_attention(
                q,
                storage[0],
                storage[1],
                block_table,
                seq_lens,
                check_indices=False,
                return_lse=True,
            )

    def inputs(B: int) -> tuple:
        x = _attention_inputs(torch.float32, device, B=B, S=1)
        storage = torch.stack([x["k_cache"], x["v_cache"]])
        lens = x["seq_lens"] + 1  # the step's token is written at position seq_lens[b]
        table = x["block_table"]
        slots = table[torch.arange(B), x["seq_lens"] // 16].long() * 16 + x["seq_lens"] % 16
        k, v = (torch.randn(B, 2, 64, device=device) for _ in range(2))
        return storage, x["q"], k, v, slots, table, lens

    batch = Dim("batch", min=2, max=64)
    shapes = (
        {1: Dim("num_blocks")},
        {0: batch},
        {0: batch},
        {0: batch},
        {0: batch},
        {0: batch},
        {0: batch},
    )
    program = torch.export.export(Layer(), inputs(3), dynamic_shapes=shapes)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"stopkit.write_kv.default", "stopkit.paged_attention.default"} <= targets, targets
    args = inputs(2)
    want_storage = args[0].clone()
    want = Layer()(want_storage, *args[1:])
    got = program.module()(*args)
    _close(got, want, torch.float32)
    assert torch.equal(args[0], want_storage)
