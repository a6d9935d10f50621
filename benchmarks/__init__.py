"""psmc's benchmark suite (issue 7): `python -m benchmarks --help`.

Benchmarks are never unit tests: they time psmc's layers side by side with the peers that
happen to be installed (the `bench` extra) in one run, on this machine, and write the table to
docs/benchmarks.md. They install nothing and skip (and name) every missing peer.
"""
