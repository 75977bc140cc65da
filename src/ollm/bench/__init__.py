"""``ollm bench``: timed cases next to this machine's floors, and peers on the same workload.

* ``probes``: disk (cold / page cache), host->GPU (pinned / pageable), memory and matmul rates.
* ``run``: one case per context (warm-up, then a timed greedy generate) and the whole report.
* ``floors``: the least time prefill and a decode step can take under the measured rates.
* ``report`` / ``plot``: the printed tables and the per-layer timeline (matplotlib).
* ``models``: cached synthetic layer stores and HF checkpoints of the same shapes for peers.
* ``peers`` / ``peer_worker``: results of peer engines run by ``scripts/peers.py``.

``ollm.cli`` imports these inside the ``bench`` command, so ``import ollm.cli`` stays light.
"""
