"""Peer servers for benchmarks, built from source on this machine and cached (nothing of them is committed),
and `qwenkit serve` measured against them (issue 12, item 2).

    python benchmarks/peers.py           # build (once) and print the path of llama.cpp's C++ llama-server
    python benchmarks/peers.py run       # qwenkit serve vs llama-server vs llama_cpp.server, 0.5B q4_0
    python benchmarks/peers.py run --quick   # tiny demo, few requests: checks the script runs

`llama_server()` returns llama.cpp's own `llama-server` built from the llama.cpp that the llama-cpp-python
sdist vendors (LLAMA_CPP_PYTHON_VERSION, the one qwenkit's engine links), so both sides run the same kernels.
It downloads the sdist with pip into the cache, extracts vendor/llama.cpp, builds only the llama-server
target with cmake (Release, GGML_NATIVE=ON like the wheel, static, no tests/examples/UI/OpenSSL: offline; on
x86 without ggml's AMX kernels, which crash, as the README builds the wheel) and keeps the binary under
`cache_root()/bench/`; later calls return it without building (~7 min on 2 cores).

`run` starts `qwenkit serve` (first, so its --poll auto sees no peer loading), llama-server and
`python -m llama_cpp.server` on the same GGUF and --threads, one after another, each ready before the next
starts; then `qwenkit bench --compare`'s API (qwenkit.bench.run_bench) measures them in alternating rounds,
one endpoint at a time (idle servers take no CPU): streaming /v1/completions, greedy, EOS ignored where the
server allows it, --output-len tokens, ~--input-len-token unique prompts, closed loop at each concurrency.
--one-at-a-time runs each server alone instead (started, measured, stopped). Prints qwenkit / llama-server
output tok/s per concurrency (goal >= 1.0 at 1, 4 and 16) and TTFT max at the top concurrency (goal <=
llama-server's); writes benchmarks/results/peers-*.json, the table, and the bench HTML/PNG report under
--report-dir. qwenkit runs at its default --poll auto (its choice is in the JSON): on a busy machine that is
0 while the peers' OpenMP workers keep spinning (llama-server's own --poll does nothing in an OpenMP
build); --qwenkit-arg=--poll=50 or --peer-env OMP_WAIT_POLICY=PASSIVE compares like with like.
The exact server commands and logs are in the JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from qwenkit.paths import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    # Offline build: no HTTPS model download, no web UI fetched from the hub or built with npm.
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
)


def _sdist(root: Path, version: str) -> Path:
    """The llama-cpp-python sdist tarball, downloaded once with pip (its HTTP cache usually has it)."""
    dest = root / "sdist"
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(dest)]
    subprocess.run([*pip, f"llama-cpp-python=={version}"], check=True)
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no llama_cpp_python-{version}.tar.gz in {dest}")
    return found[0]


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """vendor/llama.cpp of the sdist, extracted once into dest."""
    if (dest / "CMakeLists.txt").is_file():
        return dest
    prefix = sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise RuntimeError(f"{sdist} holds no {prefix}")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
        tar.extractall(tmp, members=members, **safe)
        shutil.move(Path(tmp) / prefix, dest)  # whole tree at once: a half extraction never looks done
    return dest


def llama_server(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2) -> Path:
    """Path to a `llama-server` binary built from this llama-cpp-python version's vendored llama.cpp."""
    root = cache_root() / "bench" / f"llama.cpp-{version}"
    binary = root / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    src = _extract_llama_cpp(_sdist(root, version), root / "src")
    build = root / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    options = list(CMAKE_OPTIONS)
    if platform.machine().lower() in ("x86_64", "amd64"):
        from qwenkit.engines.llamacpp.model import NO_AMX_FLAGS

        options += [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, *options], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], check=True)
    built = build / "bin" / "llama-server"
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary.with_suffix(".tmp"))
    binary.with_suffix(".tmp").rename(binary)  # appears only once complete
    return binary


SIDES = ("qwenkit", "llama_server", "llama_cpp_server")
SHORT = {"qwenkit": "qwenkit", "llama_server": "llama-srv", "llama_cpp_server": "lcpp.server"}
MODEL_NAME = "bench"


def add_extra_word_options(ap: argparse.ArgumentParser) -> None:
    """--qwenkit-arg / --llama-server-arg: extra command-line words for server_commands()."""
    ap.add_argument(
        "--qwenkit-arg", action="append", default=[], help="extra serve word: --qwenkit-arg=--poll=0"
    )
    ap.add_argument("--llama-server-arg", action="append", default=[], help="extra llama-server word")


def server_commands(args: argparse.Namespace, ports: dict[str, int]) -> dict[str, tuple[list[str], str]]:
    """Each side's command and health path: same GGUF, threads, and room for the top concurrency."""
    slots = max(args.concurrency)
    ctx = slots * args.ctx_per_seq
    exe = Path(sys.executable)
    model = str(args.model)
    cmds: dict[str, tuple[list[str], str]] = {}
    if "qwenkit" in args.sides:
        cmd = [str(exe.parent / "qwenkit"), "serve", "--model", model, "--port", str(ports["qwenkit"])]
        cmd += ["--threads", str(args.threads), "--max-seqs", str(slots), "--ctx", str(ctx)]
        cmds["qwenkit"] = ([*cmd, "--served-model-name", MODEL_NAME, *args.qwenkit_arg], "/health")
    if "llama_server" in args.sides:
        cmd = [str(llama_server()), "-m", model, "--host", "127.0.0.1", "--port", str(ports["llama_server"])]
        cmd += ["-t", str(args.threads), "-tb", str(args.threads), "--parallel", str(slots), "-c", str(ctx)]
        cmds["llama_server"] = ([*cmd, "--no-webui", "-a", MODEL_NAME, *args.llama_server_arg], "/health")
    if "llama_cpp_server" in args.sides:
        # One request at a time (no batching); --interrupt_requests False lets queued streams finish.
        cmd = [str(exe), "-m", "llama_cpp.server", "--model", model, "--port", str(ports["llama_cpp_server"])]
        cmd += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
        cmd += [
            "--n_ctx",
            str(args.ctx_per_seq),
            "--interrupt_requests",
            "False",
            "--model_alias",
            MODEL_NAME,
        ]
        cmds["llama_cpp_server"] = (cmd, "/v1/models")
    return cmds


def _log(name: str) -> Path:
    from qwenkit.paths import cache_root

    log = cache_root() / "bench" / "logs" / f"peers-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    return log


def _bench_config(args: argparse.Namespace, urls: list[str], labels: list[str]) -> Any:
    from qwenkit.bench import BenchConfig

    return BenchConfig(
        base_url=urls[0],
        compare=urls[1:],
        labels=labels,
        model=MODEL_NAME,
        endpoint="completions",
        concurrency=args.concurrency,
        num_requests=args.num_requests,
        input_len=args.input_len,
        output_len=args.output_len,
        warmup=args.warmup,
        rounds=args.rounds,
        seed=args.seed,
    )


def measure(args: argparse.Namespace) -> tuple[Any, dict[str, list[str]], dict[str, str]]:
    """(BenchReport, commands, log paths): all sides up and measured in turns, or each alone."""
    from serve import free_port, start, stop, wait_ready

    from qwenkit.bench import run_bench

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ports = {name: free_port() for name in args.sides}
    cmds = server_commands(args, ports)
    logs = {name: _log(name) for name in cmds}
    order = [name for name in SIDES if name in cmds]
    progress = _progress()

    def up(name: str) -> subprocess.Popen[bytes]:
        cmd, health = cmds[name]
        extra = dict(kv.split("=", 1) for kv in args.peer_env) if name != "qwenkit" else {}
        proc = start(cmd, env | extra, logs[name])
        try:
            wait_ready(f"http://127.0.0.1:{ports[name]}{health}", proc)
        except Exception as exc:
            stop(proc)
            raise RuntimeError(
                f"{name} did not start; its log ({logs[name]}) ends with:\n" + _tail(logs[name])
            ) from exc
        return proc

    url = {name: f"http://127.0.0.1:{ports[name]}/v1" for name in order}
    if not args.one_at_a_time:
        procs = []
        try:
            for name in order:  # one at a time: a loading server would skew the next one's start
                procs.append(up(name))
            report = run_bench(_bench_config(args, [url[n] for n in order], order), progress)
        finally:
            for proc in procs:
                stop(proc)
    else:
        reports = []
        for name in order:
            proc = up(name)
            try:
                reports.append(run_bench(_bench_config(args, [url[name]], [name]), progress))
            finally:
                stop(proc)
        report = reports[0].model_copy(
            update={
                "endpoints": [e for r in reports for e in r.endpoints],
                "levels": [lv for r in reports for lv in r.levels],
                "finished_at": reports[-1].finished_at,
            }
        )
    return report, {n: c for n, (c, _) in cmds.items()}, {n: str(p) for n, p in logs.items()}


def _progress() -> Any:
    done_at = [0]

    def update(done: int, total: int) -> None:
        if done != done_at[0] and (done == total or done - done_at[0] >= max(1, total // 10)):
            done_at[0] = done
            print(f"  {done}/{total} requests", flush=True)

    return update


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:]


def qwenkit_poll(log: str) -> str | None:
    """What `qwenkit serve --poll auto` chose, as it said on stderr."""
    found = re.search(r"--poll auto: (.*)", Path(log).read_text(errors="replace"))
    return found.group(1).strip() if found else None


def summarize(report: Any, sides: list[str], top: int) -> dict[str, Any]:
    """Per concurrency: each side's tok/s and TTFT, qwenkit's ratios; the goals checked."""
    rows = []
    for c in report.config.concurrency:
        row: dict[str, Any] = {"concurrency": c}
        for side in sides:
            lv = report.level(side, concurrency=c)
            row[side] = {
                "output_tok_s": lv.output_tok_s,
                "output_tok_s_rounds": lv.output_tok_s_rounds,
                "ttft_p50_s": lv.ttft.get("p50"),
                "ttft_max_s": lv.ttft.get("max"),
                "itl_p50_s": lv.itl.get("p50"),
                "completed": lv.completed,
                "failed": lv.failed,
                "output_tokens": lv.output_tokens,
                "tokens_source": lv.tokens_source,
                "client_cpu_share": lv.client_cpu_share,
            }
        ours = row.get("qwenkit", {}).get("output_tok_s")
        for peer in ("llama_server", "llama_cpp_server"):
            if ours is not None and peer in row and row[peer]["output_tok_s"]:
                row[f"qwenkit_vs_{peer}"] = ours / row[peer]["output_tok_s"]
        rows.append(row)
    goals: dict[str, Any] = {"tok_s_ratio_min": 1.0, "ttft_max_at_top_vs_llama_server_max": 1.0}
    if "qwenkit" in sides and "llama_server" in sides:
        ratios = [r["qwenkit_vs_llama_server"] for r in rows if "qwenkit_vs_llama_server" in r]
        top_row = next(r for r in rows if r["concurrency"] == top)
        ttft_ours, ttft_theirs = top_row["qwenkit"]["ttft_max_s"], top_row["llama_server"]["ttft_max_s"]
        goals["tok_s_ratio_met"] = bool(ratios) and all(r >= 1.0 for r in ratios)
        goals["ttft_max_at_top"] = {"qwenkit": ttft_ours, "llama_server": ttft_theirs, "concurrency": top}
        goals["ttft_max_at_top_met"] = (
            ttft_ours is not None and ttft_theirs is not None and ttft_ours <= ttft_theirs
        )
    return {"rows": rows, "goals": goals}


def run_main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from common import bench_model, machine, write_results
    from rich.table import Table

    from qwenkit.bench import write_report
    from qwenkit.paths import cache_root

    ap = argparse.ArgumentParser(prog="peers.py run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny demo, 1 and 4 streams, few short requests")
    ap.add_argument("--model", type=Path, help="a GGUF (default: the 0.5B-shape q4_0 demo)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    ap.add_argument("--num-requests", type=int, default=16, help="requests per side, level and round")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per level, pooled")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx-per-seq", type=int, default=512, help="KV room per slot")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"which servers: {', '.join(SIDES)}")
    ap.add_argument("--one-at-a-time", action="store_true", help="each server alone: start, measure, stop")
    add_extra_word_options(ap)
    ap.add_argument(
        "--peer-env",
        action="append",
        default=[],
        help="KEY=VALUE for both peers, e.g. OMP_WAIT_POLICY=PASSIVE: their OpenMP workers then sleep as "
        "qwenkit's do at --poll 0 (llama-server's own --poll does nothing in an OpenMP build)",
    )
    ap.add_argument(
        "--report-dir", type=Path, help="bench HTML/PNG report (default: cache/bench/peers-report)"
    )
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if bad := [kv for kv in args.peer_env if "=" not in kv]:
        ap.error(f"--peer-env wants KEY=VALUE (got {bad[0]!r})")
    if unknown := set(args.sides) - set(SIDES):
        ap.error(f"unknown --sides {sorted(unknown)}: use {', '.join(SIDES)}")
    if args.quick:
        args.concurrency, args.num_requests, args.input_len, args.output_len = [1, 4], 4, 32, 16
        args.rounds, args.warmup = 1, 1
    args.model = args.model or bench_model(
        *(("qwen3", "tiny", "q8_0") if args.quick else ("qwen2", "0.5b", "q4_0"))
    )
    name = "peers-quick" if args.quick else "peers"

    report, commands, logs = measure(args)
    report_dir = args.report_dir or cache_root() / "bench" / f"{name}-report"
    _, note = write_report(report, report_dir)
    top = max(args.concurrency)
    summary = summarize(report, args.sides, top)
    done = subprocess.run([str(llama_server()), "--version"], capture_output=True, text=True)
    payload = {
        "model": str(args.model),
        "threads": args.threads,
        "workload": {
            k: getattr(args, k)
            for k in ("concurrency", "num_requests", "input_len", "output_len", "rounds", "warmup", "seed")
        }
        | {"endpoint": "/v1/completions, streaming, greedy, ignore_eos", "mode": _mode(args)},
        "commands": commands,
        "peer_env": args.peer_env,
        "logs": logs,
        "qwenkit_poll": qwenkit_poll(logs["qwenkit"]) if "qwenkit" in logs else None,
        "llama_server_version": (done.stdout + done.stderr).strip().splitlines()[:2],
        "llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION,
        "machine": machine(),
        "bench_report": str(report_dir),
        **summary,
    }
    table = Table(
        title=f"peers: {Path(args.model).name}, {args.threads} thr, {args.output_len} tok, {_mode(args)}"
    )
    table.add_column("streams")
    for side in args.sides:
        table.add_column(f"{SHORT[side]} tok/s")
    table.add_column("qwenkit / llama-srv")
    table.add_column("TTFT max s: " + " / ".join(SHORT[s] for s in args.sides))
    for row in summary["rows"]:
        ratio = row.get("qwenkit_vs_llama_server")
        table.add_row(
            str(row["concurrency"]),
            *(f"{row[s]['output_tok_s']:.1f}" for s in args.sides),
            "-" if ratio is None else f"{ratio:.2f}x",
            " / ".join(_num(row[s]["ttft_max_s"]) for s in args.sides),
        )
    goals = summary["goals"]
    table.caption = (
        f"goals: qwenkit / llama-server >= 1.0 at every level ({_met(goals.get('tok_s_ratio_met'))}); "
        f"TTFT max at {top} <= llama-server's ({_met(goals.get('ttft_max_at_top_met'))}); qwenkit poll: "
        f"{payload['qwenkit_poll'] or 'as given'}; report: {report_dir}" + (f"; {note}" if note else "")
    )
    write_results(name, payload, table)


def _mode(args: argparse.Namespace) -> str:
    return "each server alone" if args.one_at_a_time else "all up, alternating rounds"


def _num(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.2f}"


def _met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("met" if flag else "not met")


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run_main(sys.argv[2:])
    else:
        print(llama_server())
