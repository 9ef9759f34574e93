"""`qwenkit bench`: speed of any OpenAI-compatible server (TTFT, ITL, latency, tok/s, goodput).

The Python API (used by `qwenkit compare`): `run_bench(BenchConfig(...)) -> BenchReport`; each of
`report.levels` is one endpoint at one level with `output_tok_s` and the `ttft`, `itl`, `e2e` percentile
dicts (seconds: p50, p90, p95, p99, mean, max); `write_report(report, out_dir)` writes JSON, PNG and HTML.
client.py is the raw-socket load generator, metrics.py the arithmetic, report.py the outputs.
"""

from qwenkit.bench.report import write_report
from qwenkit.bench.run import BenchConfig, BenchError, BenchReport, EndpointInfo, LevelResult, run_bench

__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchReport",
    "EndpointInfo",
    "LevelResult",
    "run_bench",
    "write_report",
]
