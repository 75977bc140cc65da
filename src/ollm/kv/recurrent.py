"""The per-layer state of a linear-attention layer (gated DeltaNet, Qwen3-Next), in place of KV.

It has the KV cache's lifecycle: created for a request (zeros) by ``Runner.new_kv``, advanced by
every forward, closed with the request; ``length`` counts the tokens it has absorbed, as a KV
cache's does (the runner reads positions from ``kv[0]``). Its size is fixed, whatever the
context: per sequence the convolution's last ``kernel - 1`` inputs and the delta-rule matrix
[v_heads, k_dim, v_dim] in float32. It lives on the layer's KV device, or in (pinned) host memory
for a layer whose KV the plan offloads; a forward on another device copies it there and back.
It cannot roll back (no ``trim`` below its length): paged batching and speculative decoding,
which trim or fork KV, do not run these layers (``engine/kvpools.batch_unsupported``).
"""

from __future__ import annotations

import torch

from ollm.layers.deltanet import LinearAttnSpec


class RecurrentState:
    """Conv inputs [B, conv_dim, K-1] (activations' dtype) and the state [B, H_v, dk, dv] (float32)."""

    router = None  # no attention routing over a state (the runner looks for one on every layer)

    def __init__(
        self,
        batch: int,
        lin: LinearAttnSpec,
        dtype: torch.dtype,
        device: torch.device | str,
        pin: bool = False,
    ) -> None:
        conv = (batch, lin.conv_dim, lin.conv_kernel - 1)
        ssm = (batch, lin.num_v_heads, lin.k_dim, lin.v_dim)
        self.conv = torch.zeros(conv, dtype=dtype, device=device, pin_memory=pin)
        self.ssm = torch.zeros(ssm, dtype=torch.float32, device=device, pin_memory=pin)
        self.length = 0

    def load(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conv inputs, state) on ``device`` for a forward; the state is None before the first
        forward (the rule then starts from zeros, as transformers' prefill does)."""
        conv, ssm = self.conv, self.ssm
        if conv.device != device:
            conv, ssm = conv.to(device, non_blocking=True), ssm.to(device, non_blocking=True)
        return conv, (ssm if self.length else None)

    def store(self, conv: torch.Tensor, ssm: torch.Tensor, tokens: int) -> None:
        """Keep a forward's new conv inputs and state; ``tokens`` more have been absorbed.
        A copy from the GPU into pinned RAM is queued on the compute stream, not waited for:
        the next ``load`` copies back on the same stream, after it, and the CPU reads the state
        (a hybrid layer's CPU decode) only after the step's logits came to the host."""
        self.conv.copy_(conv, non_blocking=True)
        self.ssm.copy_(ssm, non_blocking=True)
        self.length += tokens

    def trim(self, length: int) -> None:
        """A recurrent state cannot forget tokens: only a no-op trim is allowed."""
        if length < self.length:
            raise RuntimeError(
                f"a linear-attention state cannot roll back from {self.length} to {length} tokens"
            )

    def flush(self) -> bool:
        """Nothing is buffered elsewhere."""
        return False

    def close(self) -> None:
        """Memory is freed with the tensors."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))

    def __len__(self) -> int:
        return self.length
