"""`moeco bench ...`: benchmarks users run against their own models and servers."""

from __future__ import annotations


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: serving engine throughput, HTTP server load")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    from moeco.serve import bench_throughput

    bench_throughput.add_parser(bench_sub)  # moeco bench throughput: the engine offline
    from moeco.serve import bench_serve

    bench_serve.add_parser(bench_sub)  # moeco bench serve: a load generator for a running server
