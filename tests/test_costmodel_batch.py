"""The cost model's choice for a batched decode step: the plan's CPU layers or every layer
streamed. Rates and shapes of the H200 host's batch-16 run of 2026-12-02 (Llama-3.1-8B shapes,
8 GiB, 2k-token prompts: 13 CPU layers, 29 RAM layers; `docs/runs/2026-12-02/
batch_engine_profile_b18d9d5.json`), where the hybrid step ran at 52.2 tok/s and every layer
streamed at 64.5 tok/s."""

import pytest

from ollm.planning.costmodel import (
    CPU_FLOPS_ROWS,
    CPU_FLOPS_TOKENS,
    MachineRates,
    cpu_step_layer_s,
    hybrid_step_pays,
)

LAYER = 416 << 20  # bytes of one bf16 layer (436 MB)
PARAMS = LAYER // 2
KV_TOKEN = 2 * 8 * 128 * 2  # KV bytes per token and layer
N_CPU, N_RAM, ROWS, CONTEXT = 13, 29, 16, 2064
# The device profile: the CPU layers' matmuls over 16 rows took 145 ms per step.
MM_S = 0.145
FLOPS_ROWS = 2 * PARAMS * ROWS * N_CPU / MM_S  # ~0.63 TFLOP/s at 16 rows


def rates(**kw) -> MachineRates:
    base = dict(
        pcie=55e9, pcie_shared=55e9, cpu_mem=50e9, cpu_mem_shared=50e9, cpu_threads=14,
        cpu_flops=4.1e12, gpu_mem=4.0e12, gpu_flops=7.5e14, cpu_attn=8.5e9,
    )  # fmt: skip
    return MachineRates(**{**base, **kw})


def kv(rows: int) -> int:
    return rows * CONTEXT * KV_TOKEN


def test_batch16_streams_with_the_brief_rates_and_batch1_keeps_the_cpu_layers():
    """Weight read 50 GB/s, 16-row matmul rate as profiled, KV attention 8.5 GB/s: the CPU's
    chain (13 layers) is longer than streaming all 29 RAM layers at 55 GB/s at batch 16, shorter
    at batch 1."""
    r = rates(cpu_flops_rows=FLOPS_ROWS)
    layer16 = cpu_step_layer_s(r, LAYER, 2, ROWS, kv(ROWS))
    # max(8.7 ms weight read, 11.2 ms of matmuls) + 15.9 ms of attention
    assert layer16 == pytest.approx(MM_S / N_CPU + kv(ROWS) / 8.5e9, rel=1e-6)
    assert N_CPU * layer16 > N_RAM * LAYER / 55e9
    assert not hybrid_step_pays(r, N_CPU, N_RAM, LAYER, 2, ROWS, kv(ROWS))
    layer1 = cpu_step_layer_s(r, LAYER, 2, 1, kv(1))
    assert layer1 == pytest.approx(LAYER / 50e9 + kv(1) / 8.5e9, rel=1e-6)  # weight-read-bound
    assert hybrid_step_pays(r, N_CPU, N_RAM, LAYER, 2, 1, kv(1))


def test_calibrated_rates_of_one_query_chose_the_hybrid_the_batch_rates_do_not():
    """As the device calibrates them, the 256-row matmul rate (4.1 TFLOP/s) makes 16 rows look
    weight-read-bound and one query's attention rate (contiguous KV, ~26.5 GB/s: the profile's
    CPU flash attention) leaves out the gather of paged KV (the profile's index_select, ~22.6
    GB/s): those predict a CPU chain of ~180 ms and keep the CPU layers. With the 16-row
    matmul rate and the gather the chain is ~290 ms (the profile: mm 145 + index_select 77.5 +
    attention 66 = 288.5 ms) and all 29 layers streamed (~230 ms) win."""
    attn, gather = 1.75e9 / 0.066, 1.75e9 / 0.0775  # 16 x 2k tokens x 13 layers of KV
    old = rates(cpu_attn=attn)
    assert N_CPU * cpu_step_layer_s(old, LAYER, 2, ROWS, kv(ROWS)) == pytest.approx(0.180, 0.05)
    assert hybrid_step_pays(old, N_CPU, N_RAM, LAYER, 2, ROWS, kv(ROWS))
    new = rates(cpu_attn=attn, cpu_flops_rows=FLOPS_ROWS, cpu_gather=gather)
    chain = N_CPU * cpu_step_layer_s(new, LAYER, 2, ROWS, kv(ROWS))
    assert chain == pytest.approx(0.145 + 0.0775 + 0.066, rel=0.05)
    assert not hybrid_step_pays(new, N_CPU, N_RAM, LAYER, 2, ROWS, kv(ROWS))
    assert hybrid_step_pays(new, N_CPU, N_RAM, LAYER, 2, 1, kv(1))  # one sequence still pays
    # batch 64 streams as before
    assert not hybrid_step_pays(new, N_CPU, N_RAM, LAYER, 2, 64, kv(64))


def test_cpu_matmul_rate_by_rows():
    """The few-row rate up to CPU_FLOPS_ROWS rows, the many-row one from CPU_FLOPS_TOKENS,
    linear between; without a few-row measurement the many-row rate, as before."""
    r = rates(cpu_flops_rows=1e12)
    assert r.cpu_matmul_flops(1) == r.cpu_matmul_flops(CPU_FLOPS_ROWS) == 1e12
    assert r.cpu_matmul_flops(CPU_FLOPS_TOKENS) == r.cpu_matmul_flops(4096) == 4.1e12
    mid = (CPU_FLOPS_ROWS + CPU_FLOPS_TOKENS) // 2
    assert r.cpu_matmul_flops(mid) == pytest.approx(2.55e12)
    assert rates().cpu_matmul_flops(16) == 4.1e12
    assert rates(cpu_flops_rows=9e12).cpu_matmul_flops(1) == 4.1e12  # noise above: capped


def test_cpu_gather_rate_is_measured_on_this_cpu():
    from ollm.engine.calibrate import cpu_gather_rate

    rate = cpu_gather_rate(nbytes=4 << 20)
    assert 1e8 < rate < 1e12  # bytes/s of a real copy


def test_step_start_host_time_leaves_a_full_ring_idle_behind_resident_layers():
    """11 resident layers first, then 21 streamed (copy 8.2 ms each), ring of 2, the batch
    engine's chain (2.3 ms a layer, 3.5 ms at the step's start): the copy engine waits while the
    resident layers compute; spread between the streamed ones, they hide under the copies, and
    the single-sequence chain (1 ms, nothing at the start) sees no difference."""
    from ollm.planning.costmodel import decode_chain, interleave, pipeline_step

    n, copy_s = 32, 8.2e-3
    first = set(range(11))
    spread = interleave(list(range(n)), 11)
    copies = {k: [0.0 if i in res else copy_s for i in range(n)] for k, res in
              (("first", first), ("spread", spread))}  # fmt: skip
    layer, start = decode_chain(True)
    step = {k: pipeline_step([layer] * n, c, 2, start_s=start) for k, c in copies.items()}
    assert step["spread"] == pytest.approx(21 * copy_s, rel=1e-6)  # the copies' floor
    assert step["first"] > step["spread"] + 10e-3
    layer, start = decode_chain(False)
    assert start == 0.0
    single = {k: pipeline_step([layer] * n, c, 2) for k, c in copies.items()}
    assert single["first"] == pytest.approx(single["spread"], rel=1e-6)
