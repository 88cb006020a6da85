"""stopkit.ops write_kv, copy_blocks and stop_score against their oracles, and their bad-input
rules (exception type, the argument named, the cache left unchanged)."""

from __future__ import annotations

import pytest
import torch

from stopkit import ops, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
META = torch.device("meta")


def rand(*shape: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


# ---- write_kv ----


def _write_inputs(
    T: int,
    dtype: torch.dtype,
    device,
    num_blocks: int = 6,
    block_size: int = 8,
    Hkv: int = 2,
    D: int = 48,
) -> dict:
    """T tokens to distinct random slots, every third one skipped with -1."""
    slots = torch.randperm(num_blocks * block_size)[:T]
    slots[::3] = -1
    return dict(
        k=rand(T, Hkv, D, dtype=dtype, device=device),
        v=rand(T, Hkv, D, dtype=dtype, device=device),
        k_cache=rand(num_blocks, block_size, Hkv, D, dtype=dtype, device=device),
        v_cache=rand(num_blocks, block_size, Hkv, D, dtype=dtype, device=device),
        slot_mapping=slots.to(device),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [0, 1, 7, 40])
def test_write_kv(device, dtype, T):
    kw = _write_inputs(T, dtype, device)
    expected = {n: kw[n].clone() for n in ("k_cache", "v_cache")}
    reference.write_kv(
        kw["k"], kw["v"], expected["k_cache"], expected["v_cache"], kw["slot_mapping"]
    )
    ops.write_kv(**kw)
    assert torch.equal(kw["k_cache"], expected["k_cache"]) and torch.equal(
        kw["v_cache"], expected["v_cache"]
    )


def test_write_kv_strided_inputs(device):
    """k and v sliced out of one fused projection [T, 3, Hkv, D] (non-contiguous) are read right."""
    kw = _write_inputs(20, torch.float32, device)
    fused = rand(20, 3, 2, 48, device=device)
    kw["k"], kw["v"] = fused[:, 1], fused[:, 2]
    expected = {n: kw[n].clone() for n in ("k_cache", "v_cache")}
    reference.write_kv(
        kw["k"], kw["v"], expected["k_cache"], expected["v_cache"], kw["slot_mapping"]
    )
    ops.write_kv(**kw)
    assert torch.equal(kw["k_cache"], expected["k_cache"]) and torch.equal(
        kw["v_cache"], expected["v_cache"]
    )


def _set(**changes):
    def apply(kw: dict) -> None:
        kw.update({k: (v(kw) if callable(v) else v) for k, v in changes.items()})

    return apply


def _poke(name: str, index, value):
    def apply(kw: dict) -> None:
        kw[name] = kw[name].clone()
        kw[name][index] = value

    return apply


def _strided(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, not contiguous."""
    return torch.cat([t, t], dim=-1)[..., ::2]


WRITE_BAD = {
    "k_cache-not-tensor": (
        _set(k_cache=lambda kw: kw["k_cache"].numpy()),
        TypeError,
        "^k_cache must be a torch.Tensor",
    ),
    "k_cache-dtype": (
        _set(k_cache=lambda kw: kw["k_cache"].double()),
        TypeError,
        "^k_cache must be float32",
    ),
    "k_cache-device": (
        _set(k_cache=lambda kw: kw["k_cache"].to(META)),
        ValueError,
        "^k_cache must be on",
    ),
    "v_cache-dtype": (
        _set(v_cache=lambda kw: kw["v_cache"].half()),
        TypeError,
        "^v_cache must be float32",
    ),
    "v_cache-shape": (
        _set(v_cache=lambda kw: kw["v_cache"][:-1]),
        ValueError,
        "^v_cache must have shape",
    ),
    "k_cache-strided": (
        _set(k_cache=lambda kw: _strided(kw["k_cache"])),
        ValueError,
        "^k_cache must be contiguous",
    ),
    "v_cache-strided": (
        _set(v_cache=lambda kw: _strided(kw["v_cache"])),
        ValueError,
        "^v_cache must be contiguous",
    ),
    "k-dtype": (_set(k=lambda kw: kw["k"].bfloat16()), TypeError, "^k must be float32"),
    "v-dtype": (_set(v=lambda kw: kw["v"].half()), TypeError, "^v must be float32"),
    "k-rank": (_set(k=lambda kw: kw["k"][None]), ValueError, "^k must have 3 dimensions"),
    "k-shape": (_set(k=lambda kw: kw["k"][:, :1]), ValueError, "^k must have shape"),
    "v-shape": (_set(v=lambda kw: kw["v"][:-1]), ValueError, "^v must have shape"),
    "v-device": (_set(v=lambda kw: kw["v"].to(META)), ValueError, "^v must be on"),
    "slot_mapping-dtype": (
        _set(slot_mapping=lambda kw: kw["slot_mapping"].int()),
        TypeError,
        "^slot_mapping must be int64",
    ),
    "slot_mapping-shape": (
        _set(slot_mapping=lambda kw: kw["slot_mapping"][:-1]),
        ValueError,
        "^slot_mapping must have shape",
    ),
    "slot-past-cache": (
        _poke("slot_mapping", 1, 6 * 8),
        ValueError,
        r"^slot_mapping .* \[0, 48\), got .*48\]",
    ),
    "slot-below-minus-one": (
        _poke("slot_mapping", 2, -2),
        ValueError,
        r"^slot_mapping .* got values in \[-2",
    ),
    "slot-repeated": (
        lambda kw: kw.update(
            slot_mapping=kw["slot_mapping"].clone().index_fill_(0, torch.tensor([4, 7]), 13)
        ),
        ValueError,
        "^slot_mapping must not repeat a slot .*: slot 13 appears more than once",
    ),
}


def test_write_kv_minus_one_may_repeat(device):
    """-1 (skip) is the one value that may repeat; the other tokens are written as usual."""
    kw = _write_inputs(12, torch.float32, device)
    kw["slot_mapping"][:6] = -1
    expected = {n: kw[n].clone() for n in ("k_cache", "v_cache")}
    reference.write_kv(
        kw["k"], kw["v"], expected["k_cache"], expected["v_cache"], kw["slot_mapping"]
    )
    ops.write_kv(**kw)
    assert all(torch.equal(kw[n], expected[n]) for n in expected)


def test_write_kv_unchecked_duplicates_keep_the_last_on_cpu():
    """check_indices=False with a repeated slot is the caller's bug; the CPU rule is last wins."""
    kw = _write_inputs(6, torch.float32, "cpu")
    kw["slot_mapping"] = torch.tensor([5, 9, 5, -1, 9, 5])
    ops.write_kv(**kw, check_indices=False)
    for slot, token in ((5, 5), (9, 4)):
        assert torch.equal(kw["k_cache"][slot // 8, slot % 8], kw["k"][token])
        assert torch.equal(kw["v_cache"][slot // 8, slot % 8], kw["v"][token])


@pytest.mark.parametrize("bad", [-2, 6 * 8])
def test_write_kv_native_checks_slots(bad):
    """With check_indices=False the CPU kernel itself refuses a bad slot, before writing anything;
    good slots are written exactly as with the check."""
    kw = _write_inputs(10, torch.float32, "cpu")
    expected = {n: kw[n].clone() for n in ("k_cache", "v_cache")}
    ops.write_kv(**{**kw, **expected})
    ops.write_kv(**kw, check_indices=False)
    assert all(torch.equal(kw[n], expected[n]) for n in expected)
    kw["slot_mapping"][4] = bad
    before = [kw[n].clone() for n in ("k_cache", "v_cache")]
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.write_kv(**kw, check_indices=False)
    assert all(torch.equal(kw[n], b) for n, b in zip(("k_cache", "v_cache"), before, strict=True))


@pytest.mark.parametrize("rule", WRITE_BAD)
def test_write_kv_bad_input(rule):
    kw = _write_inputs(10, torch.float32, "cpu")
    change, exc, pattern = WRITE_BAD[rule]
    change(kw)
    before = [
        t.clone()
        for t in (kw["k_cache"], kw["v_cache"])
        if isinstance(t, torch.Tensor) and t.device != META
    ]
    with pytest.raises(exc, match=pattern):
        ops.write_kv(**kw)
    after = [
        t
        for t in (kw["k_cache"], kw["v_cache"])
        if isinstance(t, torch.Tensor) and t.device != META
    ]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), (
        "a rejected call changed the cache"
    )


# ---- copy_blocks ----


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["layers-2-blocks", "blocks-only", "blocks-first"])
def test_copy_blocks(device, dtype, layout):
    """The PagedKVCache storage [layers, 2, num_blocks, bs, Hkv, D] (one call copies every plane),
    one [num_blocks, bs, Hkv, D] cache, and blocks as the first of 6 dimensions (block_dim=0)."""
    shape, block_dim = {
        "layers-2-blocks": ((3, 2, 10, 8, 2, 32), -4),
        "blocks-only": ((10, 8, 2, 32), -4),
        "blocks-first": ((10, 3, 2, 8, 2, 32), 0),
    }[layout]
    cache = rand(*shape, dtype=dtype, device=device)
    perm = torch.randperm(10)
    src, dst = perm[:4].to(device), perm[4:8].to(device)
    expected = cache.clone()
    reference.copy_blocks(expected, src, dst, block_dim=block_dim)
    assert not torch.equal(expected, cache)
    ops.copy_blocks(cache, src, dst, block_dim=block_dim)
    assert torch.equal(cache, expected)
    ops.copy_blocks(cache, src[:0], dst[:0], block_dim=block_dim)  # nothing to copy
    assert torch.equal(cache, expected)


COPY_BAD = {
    "cache-not-tensor": (
        _set(cache=lambda kw: kw["cache"].tolist()),
        TypeError,
        "^cache must be a torch.Tensor",
    ),
    "cache-device": (
        _set(
            cache=lambda kw: kw["cache"].to(META),
            src=lambda kw: kw["src"].to(META),
            dst=lambda kw: kw["dst"].to(META),
        ),
        ValueError,
        "^cache must be on",
    ),
    "cache-rank": (
        _set(cache=lambda kw: kw["cache"][0, 0, 0, 0, 0]),
        ValueError,
        "^cache must have a blocks dimension",
    ),
    "cache-strided": (
        _set(cache=lambda kw: _strided(kw["cache"])),
        ValueError,
        "^cache must be contiguous",
    ),
    "block_dim-range": (_set(block_dim=6), ValueError, r"^block_dim must be an int in \[-6, 6\)"),
    "block_dim-type": (_set(block_dim=2.0), ValueError, "^block_dim must be an int"),
    "src-dtype": (_set(src=lambda kw: kw["src"].int()), TypeError, "^src must be int64"),
    "dst-dtype": (_set(dst=lambda kw: kw["dst"].float()), TypeError, "^dst must be int64"),
    "src-rank": (_set(src=lambda kw: kw["src"][None]), ValueError, "^src must have 1 dimensions"),
    "dst-shape": (_set(dst=lambda kw: kw["dst"][:-1]), ValueError, "^dst must have shape"),
    "src-device": (_set(src=lambda kw: kw["src"].to(META)), ValueError, "^src must be on"),
    "src-range": (_poke("src", 0, 10), ValueError, r"^src and dst must lie in \[0, 10\)"),
    "dst-negative": (_poke("dst", 1, -1), ValueError, r"^src and dst must lie in \[0, 10\)"),
    "dst-duplicate": (
        lambda kw: kw.update(dst=torch.tensor([5, 5, 6])),
        ValueError,
        "^dst entries must be distinct",
    ),
    "dst-is-src": (
        lambda kw: kw.update(dst=torch.tensor([5, 6, 1])),
        ValueError,
        "^dst entries must be distinct and disjoint from src",
    ),
}


@pytest.mark.parametrize("rule", COPY_BAD)
def test_copy_blocks_bad_input(rule):
    kw = dict(
        cache=rand(2, 2, 10, 8, 2, 32), src=torch.tensor([0, 1, 2]), dst=torch.tensor([7, 8, 9])
    )
    change, exc, pattern = COPY_BAD[rule]
    change(kw)
    cache = kw["cache"]
    before = cache.clone() if isinstance(cache, torch.Tensor) and cache.device != META else None
    with pytest.raises(exc, match=pattern):
        ops.copy_blocks(**kw)
    if before is not None:
        assert torch.equal(cache, before), "a rejected call changed the cache"


# ---- stop_score ----


def _score_inputs(
    B: int, d: int, h: int, hidden_dtype, weight_dtype, device, *, norm: bool, bias: bool
) -> dict:
    w = dict(dtype=weight_dtype, device=device)
    kw = dict(
        hidden=3 * rand(B, d, dtype=hidden_dtype, device=device),
        head_weight=2 * rand(2, h or d, **w) / (h or d) ** 0.5,
    )
    if bias:
        kw["head_bias"] = 0.5 * rand(2, **w)
    if norm:
        kw["norm_weight"] = 1 + 0.2 * rand(d, **w)
    if h:
        kw["hidden_weight"] = rand(h, d, **w) / d**0.5
        if bias:
            kw["hidden_bias"] = rand(h, **w)
    return kw


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32,) * 2,
        (torch.bfloat16,) * 2,
        (torch.float16,) * 2,
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
    ],
    ids=lambda d: "hidden={}-weights={}".format(*(str(x)[6:] for x in d)),
)
@pytest.mark.parametrize("layer", [None, "gelu", "relu", "silu", "tanh", "none"])
@pytest.mark.parametrize("norm", [False, True], ids=["no-norm", "norm"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_stop_score(device, dtypes, layer, norm, bias):
    """Against the float64 oracle (inputs upcast exactly): the kernel computes in float32."""
    hidden_dtype, weight_dtype = dtypes
    kw = _score_inputs(
        33, 96, 0 if layer is None else 40, hidden_dtype, weight_dtype, device, norm=norm, bias=bias
    )
    kw["eps"] = 1e-5
    if layer is not None:
        kw["activation"] = layer
    out = ops.stop_score(**kw)
    assert out.dtype == torch.float32 and out.shape == (33,) and out.device.type == device.type
    exact = reference.stop_score(
        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    )
    assert ((exact > 0.01) & (exact < 0.99)).any()  # not all saturated
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "B,d,h", [(1, 1100, 70), (19, 513, 33), (8, 40, 32), (70, 2048, 200)], ids=str
)
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32,) * 2, (torch.bfloat16, torch.float16)],
    ids=lambda d: "hidden={}-weights={}".format(*(str(x)[6:] for x in d)),
)
def test_stop_score_hidden_layer_tiles(device, B, d, h, dtypes):
    """Shapes that end inside the CUDA kernel's tiles: rows (8 per block), hidden outputs (32 per
    block, several blocks per row tile) and staged features (chunks of 512)."""
    kw = _score_inputs(B, d, h, *dtypes, device, norm=True, bias=True)
    kw["activation"] = "silu"
    out = ops.stop_score(**kw)
    exact = reference.stop_score(
        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    )
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


def test_stop_score_empty_batch(device):
    kw = _score_inputs(0, 16, 8, torch.float32, torch.float32, device, norm=True, bias=True)
    assert ops.stop_score(**kw).shape == (0,)


SCORE_BAD = {
    "hidden-not-tensor": (
        _set(hidden=lambda kw: kw["hidden"].tolist()),
        TypeError,
        "^hidden must be a torch.Tensor",
    ),
    "hidden-dtype": (
        _set(hidden=lambda kw: kw["hidden"].double()),
        TypeError,
        "^hidden must be float32",
    ),
    "hidden-rank": (
        _set(hidden=lambda kw: kw["hidden"][0]),
        ValueError,
        "^hidden must have 2 dimensions",
    ),
    "hidden-device": (
        _set(
            **{
                n: (lambda kw, n=n: kw[n].to(META))
                for n in (
                    "hidden",
                    "head_weight",
                    "head_bias",
                    "norm_weight",
                    "hidden_weight",
                    "hidden_bias",
                )
            }
        ),
        ValueError,
        "^hidden must be on",
    ),
    "head_weight-dtype": (
        _set(head_weight=lambda kw: kw["head_weight"].int()),
        TypeError,
        "^head_weight must be float32",
    ),
    "head_weight-device": (
        _set(head_weight=lambda kw: kw["head_weight"].to(META)),
        ValueError,
        "^head_weight must be on",
    ),
    "head_weight-shape": (
        _set(head_weight=lambda kw: rand(3, 12)),
        ValueError,
        r"^head_weight must have shape \(2, 12\)",
    ),
    "head_weight-without-layer": (
        _set(hidden_weight=None, hidden_bias=None),
        ValueError,
        r"^head_weight must have shape \(2, 16\)",
    ),
    "head_bias-shape": (
        _set(head_bias=lambda kw: rand(3)),
        ValueError,
        r"^head_bias must have shape \(2,\)",
    ),
    "head_bias-dtype": (
        _set(head_bias=lambda kw: kw["head_bias"].half()),
        TypeError,
        "^head_bias must be float32",
    ),
    "norm_weight-shape": (
        _set(norm_weight=lambda kw: rand(15)),
        ValueError,
        r"^norm_weight must have shape \(16,\)",
    ),
    "norm_weight-dtype": (
        _set(norm_weight=lambda kw: kw["norm_weight"].bfloat16()),
        TypeError,
        "^norm_weight must be float32",
    ),
    "hidden_weight-shape": (
        _set(hidden_weight=lambda kw: rand(12, 17)),
        ValueError,
        r"^hidden_weight must have shape \(12, 16\)",
    ),
    "hidden_weight-empty": (
        _set(hidden_weight=lambda kw: rand(0, 16), hidden_bias=None),
        ValueError,
        "^hidden_weight must have at least one",
    ),
    "hidden_weight-dtype": (
        _set(hidden_weight=lambda kw: kw["hidden_weight"].half()),
        TypeError,
        "^hidden_weight must be float32",
    ),
    "hidden_bias-shape": (
        _set(hidden_bias=lambda kw: rand(11)),
        ValueError,
        r"^hidden_bias must have shape \(12,\)",
    ),
    "hidden_bias-alone": (
        _set(hidden_weight=None, head_weight=lambda kw: rand(2, 16)),
        ValueError,
        "^hidden_bias needs hidden_weight",
    ),
    "activation": (_set(activation="swish"), ValueError, "^activation must be one of"),
    "eps-negative": (_set(eps=-1e-6), ValueError, "^eps must be"),
    "eps-nan": (_set(eps=float("nan")), ValueError, "^eps must be"),
}


@pytest.mark.parametrize("rule", SCORE_BAD)
def test_stop_score_bad_input(rule):
    kw = _score_inputs(4, 16, 12, torch.float32, torch.float32, "cpu", norm=True, bias=True)
    change, exc, pattern = SCORE_BAD[rule]
    change(kw)
    with pytest.raises(exc, match=pattern):
        ops.stop_score(**kw)


def test_bool_window_scale_and_empty_heads_are_rejected():
    q = torch.randn(1, 1, 4, 32)
    kc = torch.randn(2, 8, 2, 32)
    bt = torch.zeros(1, 1, dtype=torch.int32)
    sl = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="window"):
        ops.paged_attention(q, kc, kc, bt, sl, window=True)
    with pytest.raises(ValueError, match="scale"):
        ops.paged_attention(q, kc, kc, bt, sl, scale=True)
    with pytest.raises(ValueError, match="num_heads"):
        ops.paged_attention(q[:, :, :0], kc, kc, bt, sl)
    with pytest.raises(ValueError, match="hidden"):
        ops.stop_score(torch.randn(3, 0), torch.randn(2, 0))
