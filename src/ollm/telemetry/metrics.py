"""Metrics that travel with every generation result."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationMetrics:
    """Counts, times and bytes of one generate() call (all sequences of the batch together)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    peak_gpu_memory: int = 0
    bytes_read_disk: int = 0
    bytes_copied_h2d: int = 0
    io_wait_host_seconds: float = 0.0  # the compute thread blocked on the disk reader
    io_stall_gpu_seconds: float = 0.0  # the compute stream stalled on weight copies (CUDA)
    read_seconds: float = 0.0
    copy_seconds: float = 0.0
    prefill_io_wait_seconds: float = 0.0  # of io_wait_seconds (host + GPU), the prefill's part
    prefill_io_seconds: float = 0.0  # disk read + host->GPU copy time during prefill
    cpu_path_seconds: float = 0.0  # hybrid decode: time the CPU computed RAM-resident layers
    finish_reason: str = ""
    device: str = "cpu"  # where the request computed (cost per token counts GPU-seconds there)
    energy_joules: float | None = None  # GPU energy of the request (NVML), None where unknown
    kv_read_fraction: float | None = None  # routed attention: KV slots read / held in decode
    kv_codecs: str | None = None  # --kv-codec auto: each KV tier's codec and bytes per token
    expert_hit_rate: float | None = None  # MoE expert cache: routed experts found on the device
    expert_cpu: int = 0  # MoE: routed experts missing from the cache run by the CPU in RAM
    # Speculative decoding (None: off): drafter, acceptance_rate, tokens_per_pass (per target
    # pass and sequence), drafter_share (of step time), counts per drafter (SpecStats.summary).
    speculation: dict | None = None

    @property
    def io_wait_seconds(self) -> float:
        """Time computation waited for weights: the sum of host waits and GPU-stream stalls."""
        return self.io_wait_host_seconds + self.io_stall_gpu_seconds

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens generated after the first one, per second of decoding."""
        steps = max(0, self.generated_tokens - 1)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def cost_per_token(self) -> dict[str, float | None]:
        """What one generated token cost: device-seconds (GPU-seconds on a GPU), bytes read from
        disk and copied host->GPU (weights and fetched KV), and joules where the GPU reports
        energy."""
        n = max(1, self.generated_tokens)
        seconds = (self.prefill_seconds + self.decode_seconds) / n
        return {
            "device_seconds": seconds,
            "gpu_seconds": seconds if self.device.startswith("cuda") else 0.0,
            "disk_bytes": self.bytes_read_disk / n,
            "h2d_bytes": self.bytes_copied_h2d / n,
            "joules": None if self.energy_joules is None else self.energy_joules / n,
        }

    def to_dict(self) -> dict[str, float | int | str]:
        d = asdict(self)
        d["cost_per_token"] = self.cost_per_token
        d["io_wait_seconds"] = self.io_wait_seconds
        d["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        d["decode_tokens_per_second"] = self.decode_tokens_per_second
        return d

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for a table."""
        from ollm.sizes import format_size

        return [
            ("prompt tokens", str(self.prompt_tokens)),
            ("generated tokens", str(self.generated_tokens)),
            (
                "prefill",
                f"{self.prefill_seconds:.3f} s ({self.prefill_tokens_per_second:.1f} tok/s)",
            ),
            ("time to first token", f"{self.time_to_first_token:.3f} s"),
            ("decode", f"{self.decode_seconds:.3f} s ({self.decode_tokens_per_second:.2f} tok/s)"),
            ("peak GPU memory", format_size(self.peak_gpu_memory)),
            ("read from disk", format_size(self.bytes_read_disk)),
            ("copied host->GPU", format_size(self.bytes_copied_h2d)),
            ("compute waited on disk reads", f"{self.io_wait_host_seconds:.3f} s"),
            ("GPU stalled on weight copies", f"{self.io_stall_gpu_seconds:.3f} s"),
            (
                "disk read time / copy time",
                f"{self.read_seconds:.3f} s / {self.copy_seconds:.3f} s",
            ),
            ("CPU path (hybrid decode)", f"{self.cpu_path_seconds:.3f} s"),
            (
                "KV read per decode step",
                "all (full attention)"
                if self.kv_read_fraction is None
                else f"{100 * self.kv_read_fraction:.1f}% of the routed layers' KV",
            ),
            *([("KV codecs (auto)", self.kv_codecs)] if self.kv_codecs else []),
            *(
                [
                    (
                        "expert cache hits",
                        f"{100 * self.expert_hit_rate:.1f}% ({self.expert_cpu} misses run by the CPU)",
                    )
                ]
                if self.expert_hit_rate is not None
                else []
            ),
            *(
                [
                    (
                        "speculation",
                        f"{self.speculation['drafter']}: "
                        f"{self.speculation['tokens_per_pass']:.2f} tokens per target pass, "
                        f"{100 * self.speculation['acceptance_rate']:.0f}% of drafts accepted, "
                        f"{100 * self.speculation['drafter_share']:.0f}% of time drafting",
                    )
                ]
                if self.speculation
                else []
            ),
            ("finish reason", self.finish_reason),
        ]


@dataclass
class EngineMetrics:
    """Scheduler and pool state of a `BatchEngine` (plain numbers for a server's /metrics)."""

    steps: int
    running: int
    waiting: int
    swapped: int
    kv_blocks: dict[str, dict[str, tuple[int, int]]]  # group -> tier -> (used, free)
    prefix_hits: int
    prefix_saved_tokens: int
    preemptions: int
    step_tokens: int  # query tokens of every step so far
    drafted: int = 0  # draft tokens verified
    accepted_drafts: int = 0  # of them, accepted
    drafter: str = ""  # the drafter's name ("" without speculation)
    acceptance_rate: float = 0.0  # accepted_drafts / drafted
    tokens_per_pass: float = 0.0  # tokens per sequence per target pass (1 without drafts)
    drafter_share: float = 0.0  # fraction of step time spent drafting
