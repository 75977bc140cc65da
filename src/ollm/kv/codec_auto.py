"""The candidates of ``--kv-codec auto`` (``planning.kv_choice`` chooses among them): exact,
int8, ``k:int4,v:int8`` and int4 with their stored bytes, measured CPU decode cost and the exact
window their measured quality needs; and the choice made without an engine (default rates at
reference shapes) for callers that hold the text ``auto`` only."""

from __future__ import annotations

from functools import lru_cache

from ollm.planning.kv_choice import (
    INT4_MIN_RECENT,
    CodecCost,
    KvCodecChoice,
    KvRates,
    KvShape,
    choose_kv_codecs,
    layer_weight_seconds,
)

AUTO_CANDIDATES = ("none", "int8", "k:int4,v:int8", "int4")
# Reference shapes of the choice made without an engine: Llama-3.1-8B (8 KV heads of 128,
# bf16, 436 MB layers streamed over the default link) at 32k tokens.
REFERENCE = {"kv_heads": 8, "head_dim": 128, "elem_bytes": 2, "layer_bytes": 436_207_616}
REFERENCE_CONTEXT = 32768


def codec_costs(head_dim: int, elem_bytes: int, group: int | None = None) -> list[CodecCost]:
    """``AUTO_CANDIDATES`` as the chooser sees them (exact first; ``group`` None: the codecs'
    default groups, what ``auto`` resolves to)."""
    from ollm.kv.codecs import parse_kv_codec

    out = [CodecCost("none", 2.0 * head_dim * elem_bytes)]
    for spec in AUTO_CANDIDATES[1:]:
        codec = parse_kv_codec(spec, INT4_MIN_RECENT, group)
        int4 = "int4" in (codec.key.kind, codec.value.kind)
        out.append(
            CodecCost(
                spec,
                codec.bytes_per_token(head_dim, elem_bytes),
                codec.cpu_attn_cost,
                INT4_MIN_RECENT if int4 else 0,
            )
        )
    return out


def choose(
    rates: KvRates,
    kv_heads: int,
    head_dim: int,
    elem_bytes: int,
    context: int,
    recent: int,
    weight_s: float,
    group: int = 32,
) -> KvCodecChoice:
    """``planning.kv_choice.choose_kv_codecs`` over ``AUTO_CANDIDATES`` for these shapes."""
    shape = KvShape(kv_heads, head_dim, elem_bytes, recent, group)
    return choose_kv_codecs(codec_costs(head_dim, elem_bytes), rates, shape, context,
                            weight_s)  # fmt: skip


@lru_cache(maxsize=8)
def default_choice(recent: int = 128) -> KvCodecChoice:
    """``auto`` where no engine chose (a ``Runner`` or ``kv_format`` given the text): default
    rates, ``REFERENCE`` shapes, ``REFERENCE_CONTEXT`` tokens, every layer streamed."""
    r = REFERENCE
    weight_s = layer_weight_seconds(KvRates(), r["layer_bytes"], streamed=1)
    return choose(KvRates(), r["kv_heads"], r["head_dim"], r["elem_bytes"], REFERENCE_CONTEXT,
                  recent, weight_s)  # fmt: skip
