"""Speed harness: ``mmprune bench`` and the table in ``benchmarks/bench_speed.py``.

Published VLM architectures built from their configs with random weights (``archs``), inputs sized as
their processors size them (``inputs``), pruned and unpruned runs timed round-robin on identical inputs
(``runner``), FastV's eager-attention reference as a baseline (``eager_fastv``), and the CLI subcommand
(``command``). FLOPs and timing helpers live in ``mmprune.efficiency`` (shared with the eval runner).
Nothing heavy is imported here.

Example:
    >>> from mmprune.bench.command import ARCH_NAMES
    >>> "llava-1.5-7b" in ARCH_NAMES
    True
"""
