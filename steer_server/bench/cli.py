"""The command line of ``steer-server bench``: ``run`` (the default), ``suite`` and ``premium``.

``run`` and ``suite`` take the steering options below; every option they do not know is one of
``vllm bench serve``'s and goes to vLLM's own parser (``steer-server bench run --vllm-help``
lists them): datasets (``--dataset-name``, ``--dataset-path``, ...), sampling, request rate and
burstiness, percentiles, goodput SLOs, ``--backend openai-chat --endpoint /v1/chat/completions``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from steer_server.bench import BenchError
from steer_server.bench.servers import STORES, ServerOptions, running_server, vector_store
from steer_server.bench.vectors import MODES
from steer_server.bench.workload import RunSpec, measure_all, vllm_options
from steer_server.settings import DEFAULT_URL, ClientSettings, load_client_settings

SUBCOMMANDS = ("run", "suite", "premium")
VLLM_OPTIONS_NOTE = ("Any other option is `vllm bench serve`'s (its datasets, sampling, request rate, "
                     "percentiles, goodput; `--vllm-help` lists them).")


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    """``run``: lists make a sweep (every combination)."""
    p.add_argument("-K", "--num-configs", type=int, nargs="+", default=[32],
                   help="distinct steering vectors, K (default: 32)")
    p.add_argument("-C", "--concurrency", type=int, nargs="+", default=[32],
                   help="concurrent requests, vLLM's max concurrency (default: 32)")
    p.add_argument("--mode", dest="modes", nargs="+", choices=MODES, default=["actadd"],
                   help="steering mode(s): actadd, constant (additions), ablate, clamp (projections on the vector; "
                   "--coeff is the clamp value) (default: actadd)")
    p.add_argument("-p", "--steered-fraction", type=float, nargs="+", default=[1.0],
                   help="share of steered requests in each test block; reference blocks steer none (default: 1)")
    p.add_argument("--input-len", type=int, nargs="+", default=[32],
                   help="prompt tokens of vLLM's random dataset (default: 32)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """What every run sends, in ``run`` and ``suite`` alike."""
    p.add_argument("--output-len", type=int, default=64, help="output tokens, fixed (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=4, help="(test, reference) block pairs, in the order T R, R T, ... "
                   "(an even number cancels a linear drift; default: %(default)s)")
    p.add_argument("--block-requests", type=int, default=0, help="requests per block (default: C, one wave)")
    p.add_argument("--warmup", type=int, default=0, help="untimed warm-up requests, half steered and at least one "
                   "per vector (default: C)")
    p.add_argument("--layer", type=int, default=2, help="layer the vectors steer (default: %(default)s)")
    p.add_argument("--rows", type=int, default=4, help="rows of each actadd vector (default: %(default)s)")
    p.add_argument("--coeff", type=float, default=4.0, help="coefficient of each addition; the vectors have unit "
                   "rows (default: %(default)s)")


def _add_server_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("servers the bench starts")
    group.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    group.add_argument("--enforce-eager", action="store_true",
                       help="eager servers (default: vLLM's compiled mode, as `steer-server serve` runs)")
    group.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                       help="another flag for every server (repeat; e.g. --server-arg=--max-num-seqs=64)")
    group.add_argument("--store", choices=STORES, default="sqlite",
                       help="the vector store: a fresh SQLite directory, or a fresh redis-server (default: sqlite)")
    group.add_argument("--store-latency-ms", type=float, default=0.0, metavar="MS",
                       help="with --store redis: a proxy in front of redis-server adds MS to every command")
    group.add_argument("--workdir", help="server logs and the store (default: a new temporary directory)")


def _add_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write everything measured as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the throughput ratios against what was swept")
    p.add_argument("--result-dir", metavar="DIR", help="also write one `vllm bench serve` result JSON per run and "
                   "class of request")
    p.add_argument("--vllm-help", action="store_true", help="show `vllm bench serve`'s options and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer-server bench", allow_abbrev=False,
                                     description="What steering costs a vLLM server, measured side by side.")
    sub = parser.add_subparsers(dest="bench_command", metavar="{run,suite,premium}")

    run = sub.add_parser("run", help="steered vs unsteered on one server (the default)", allow_abbrev=False,
                         epilog=VLLM_OPTIONS_NOTE)
    target = run.add_argument_group("the server")
    client = load_client_settings()
    target.add_argument("--url", default=client.url,
                        help=f"a running server (default: ${ClientSettings.variable('url')} or {DEFAULT_URL})")
    target.add_argument("--api-key", default=client.api_key,
                        help="its --api-key (default: $STEER_API_KEY or $OPENAI_API_KEY)")
    target.add_argument("--serve", action="store_true", help="start a steer-server for this run instead of --url "
                        "(see the server options below), and stop it afterwards")
    _add_sweep_options(run)
    _add_run_options(run)
    _add_server_options(run)
    _add_outputs(run)
    run.set_defaults(bench_func=run_command)

    suite = sub.add_parser("suite", help="plain vLLM vs plugin loaded, then the steering sweep; starts its own "
                           "servers", allow_abbrev=False, epilog=VLLM_OPTIONS_NOTE)
    suite.add_argument("-K", "--ks", type=int, nargs="*", default=[1, 8, 32, 128],
                       help="K sweep at -C in every mode (none: skip; default: %(default)s)")
    suite.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="(default: %(default)s)")
    suite.add_argument("-C", "--concurrency", type=int, default=32, help="C of the K sweep (default: %(default)s)")
    suite.add_argument("--cs", type=int, nargs="*", default=[8, 16, 32],
                       help="C sweep, first mode, K = --c-sweep-k (default: %(default)s)")
    suite.add_argument("--c-sweep-k", type=int, default=32,
                       help="K of the C sweep, the mixed run and the long-prompt runs (default: %(default)s)")
    suite.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                       help="a run whose test blocks steer a fraction -p (default: on)")
    suite.add_argument("-p", "--steered-fraction", type=float, default=0.5, help="p of the mixed run "
                       "(default: %(default)s)")
    suite.add_argument("--input-len", type=int, default=32, help="prompt tokens (default: %(default)s)")
    suite.add_argument("--long-prompts", type=int, nargs="*", default=[], metavar="TOKENS",
                       help="runs with these prompt lengths, first mode, K = --c-sweep-k (e.g. 1536 4096; "
                       "default: none)")
    _add_run_options(suite)
    suite.add_argument("--baseline-pairs", type=int, default=3, help="plain/plugin server pairs, alternating "
                       "order (0 skips the baseline; default: %(default)s)")
    suite.add_argument("--baseline-blocks", type=int, default=6, help="unsteered blocks per baseline server "
                       "(default: %(default)s)")
    suite.add_argument("--baseline-concurrency", type=int, default=32)
    _add_server_options(suite)
    _add_outputs(suite)
    suite.set_defaults(bench_func=suite_command)

    premium = sub.add_parser("premium", help="the paper's inference-time premium (offline vllm.LLM)")
    from steer_server.bench.premium import add_premium_arguments, premium_command

    add_premium_arguments(premium)
    premium.set_defaults(bench_func=premium_command)
    return parser


def server_options_of(args) -> ServerOptions:
    options = ServerOptions(model=args.model, enforce_eager=args.enforce_eager, server_args=tuple(args.server_arg),
                            store=args.store, store_latency_ms=args.store_latency_ms)
    options.validate()
    return options


def run_specs(args) -> list[RunSpec]:
    common = dict(output_len=args.output_len, pairs=args.pairs, block_requests=args.block_requests,
                  warmup=args.warmup, layer=args.layer, rows=args.rows, coeff=args.coeff)
    specs = [RunSpec(mode=mode, num_configs=k, concurrency=c, steered_fraction=p, input_len=n, **common)
             for mode in args.modes for n in args.input_len for c in args.concurrency
             for p in args.steered_fraction for k in args.num_configs]
    for spec in specs:
        spec.validate()
    return specs


def _workdir(args) -> Path:
    return Path(args.workdir or tempfile.mkdtemp(prefix="steer-bench-"))


def run_command(args, vllm_argv: list[str]) -> int:
    from steer_server.bench.report import machine_info

    options = vllm_options(vllm_argv)
    specs = run_specs(args)
    if not args.serve and (args.model or args.enforce_eager or args.server_arg or args.store != "sqlite"
                           or args.store_latency_ms):
        raise BenchError("--model, --enforce-eager, --server-arg and --store* are for a server the bench starts: "
                         "add --serve")
    data: dict = {"kind": "steer-server bench run", "machine": machine_info(), "argv": sys.argv}
    started = time.perf_counter()
    if args.serve:
        server_options = server_options_of(args)
        workdir = _workdir(args)
        with vector_store(server_options, workdir) as store:
            with running_server("steer", server_options, store=store, log=workdir / "steer.log") as server:
                data["server"] = {"url": server.url, "start_s": server.start_s, "log": str(server.log),
                                  "model": server_options.model_and_name()[0], "args": list(server_options.server_args)}
                data["runs"] = asyncio.run(measure_all(server.url, server.api_key, options, specs))
        data["store"] = {"kind": server_options.store, "description": store.description,
                         "latency_ms": server_options.store_latency_ms,
                         "measured_added_ms": store.measured_latency_ms, "proxy": store.proxy_totals}
    else:
        data["server"] = {"url": args.url}
        data["runs"] = asyncio.run(measure_all(args.url, args.api_key, options, specs))
    data["seconds"] = time.perf_counter() - started
    _finish(args, data, title="steer-server bench run")
    return 1 if any(cls["failed"] for run in data["runs"] for cls in run["classes"].values()) else 0


def suite_command(args, vllm_argv: list[str]) -> int:
    from steer_server.bench.report import machine_info
    from steer_server.bench.suite import run_suite

    options = vllm_options(vllm_argv)
    server_options = server_options_of(args)
    base = RunSpec(mode=args.modes[0], num_configs=args.c_sweep_k, concurrency=args.concurrency,
                   input_len=args.input_len, output_len=args.output_len, pairs=args.pairs,
                   block_requests=args.block_requests, warmup=args.warmup, layer=args.layer, rows=args.rows,
                   coeff=args.coeff)
    sweep = dict(modes=args.modes, ks=args.ks, cs=args.cs, c_sweep_k=args.c_sweep_k,
                 fractions=[args.steered_fraction] if args.mixed else [], long_prompts=args.long_prompts)
    workdir = _workdir(args)
    data: dict = {"kind": "steer-server bench suite", "machine": machine_info(), "argv": sys.argv,
                  "model": server_options.model_and_name()[0], "server_args": list(server_options.server_args),
                  "enforce_eager": server_options.enforce_eager, "workdir": str(workdir)}
    started = time.perf_counter()
    data.update(run_suite(server_options, options, base, baseline_pairs=args.baseline_pairs,
                          baseline_blocks=args.baseline_blocks, baseline_concurrency=args.baseline_concurrency,
                          sweep=sweep, workdir=workdir))
    data["seconds"] = time.perf_counter() - started
    model_name = server_options.model_and_name()[1]
    _finish(args, data, title=f"steer-server on {model_name}, CPU x{os.cpu_count()}, "
                              f"{'eager' if server_options.enforce_eager else 'compiled'}")
    print(f"suite took {data['seconds'] / 60:.1f} min; server logs in {workdir}")
    return 0


def _finish(args, data: dict, title: str) -> None:
    """Targets, tables and the files asked for."""
    from steer_server.bench.plots import plot_runs
    from steer_server.bench.report import print_runs, print_targets, wide_console, write_json, write_vllm_results
    from steer_server.bench.targets import check_targets

    console = wide_console()
    store = data.get("store", {}).get("description")
    data["machine"]["load_avg_end"] = list(os.getloadavg())
    data["targets"] = check_targets(data["runs"], data.get("plain_vs_plugin"), store=store)
    baseline = data.get("plain_vs_plugin")
    if baseline:
        console.print(f"plugin loaded, unused / plain vLLM (median-block output tok/s, C={baseline['concurrency']}): "
                      f"median {baseline['median']:.3f}, spread {baseline['min']:.3f}..{baseline['max']:.3f} "
                      f"over {baseline['n']} pairs")
    if data["runs"]:
        print_runs(data["runs"], console)
    print_targets(data["targets"], console)
    if args.json:
        write_json(args.json, data)
        console.print(f"wrote {args.json}")
    if args.result_dir:
        files = write_vllm_results(args.result_dir, data["runs"])
        console.print(f"wrote {len(files)} vLLM result files to {args.result_dir}")
    if args.plot and data["runs"]:
        plot_runs(data["runs"], args.plot, title=title + (f", store {store}" if store else ""),
                  plain_vs_plugin=baseline)
        console.print(f"wrote {args.plot}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["run", *argv]  # `steer-server bench --url ...` is `bench run --url ...`
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "vllm_help", False):
        vllm_options(["--help"])
        return 0
    if args.bench_command == "premium" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.bench_command == "premium":
            return args.bench_func(args) or 0
        return args.bench_func(args, rest) or 0
    except BenchError as exc:
        print(f"steer-server bench: {exc}", file=sys.stderr)
        return 1
