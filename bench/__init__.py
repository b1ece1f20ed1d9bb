"""The benchmarks (docs/benchmarks/index.md), each a script run from the checkout's root as
``python -m bench.NAME`` (``./dev bench`` runs write_overhead and fanout); what they share is
:mod:`bench.common`."""
