"""The benchmark's sections and what they share; ``scripts/benchmark.py`` is the entry point.

Shared: ``config`` (constants, sizes), ``report`` (table lines, targets, output), ``corpus``
(deterministic texts), ``cluster`` (the PostgreSQL server, template databases), ``cpu`` (CPU
accounting from /proc), ``drain`` (the Worker in this process), ``processes`` (the fake
server and ``queue-processor run --drain`` subprocesses), ``context`` (what sections share),
``machine`` (the table's title facts).

Sections, one module each: ``floor``, ``pipeline``, ``latency``, ``local``, ``trigger``,
``claim``, ``memory``, ``cache``; each has ``run(ctx)``.
"""
