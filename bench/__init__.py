"""hivewire benchmarks: ratios measured in one run against a baseline from the same run.

Run them with ``make bench`` (or ``python bench/run.py --quick``); see bench/README.md.
``bench.common`` and ``bench.echo`` import nothing but the standard library, grpcio and
protobuf, so :mod:`bench.grpcio_versions` can run the echo baseline in throwaway
virtual environments holding other grpcio releases.
"""
