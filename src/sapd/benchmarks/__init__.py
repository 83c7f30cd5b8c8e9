"""Benchmark machinery behind ``python -m sapd.bench``: measurement (:mod:`.measure`), workloads
(:mod:`.workloads`), fresh-process memory measurement (:mod:`.memory_worker`) and the report (:mod:`.report`)."""
