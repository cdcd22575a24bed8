"""``steer-server eval sweep | paper``: command lines over ``run_sweep`` and ``run_paper``."""
from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

from steer_server.client import client_args, positions_arg
from steer_server.measure import data
from steer_server.measure.client import EvalError, Sampling, SteerClient
from steer_server.measure.journal import JournalMismatch
from steer_server.measure.metrics import Lexicon
from steer_server.measure.steerings import SERVER_PAD, ContrastPairs, NamedVector, PromptAdditions, Steering
from steer_server.settings import load_client_settings


def _server_args(parser: argparse.ArgumentParser) -> None:
    client_args(parser, load_client_settings())
    parser.add_argument("--model", help="served model name (default: the server's first)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="output directory; rerunning with the same directory resumes")


def _numbers(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer-server eval",
                                     description="Measure steering on a running steer-server over HTTP.")
    sub = parser.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("sweep", help="layers × coefficients for one steering, with a random-vector floor",
                       description="Each cell: topic share (lexicon), sentiment (VADER), fluency (NLL under the "
                       "unsteered model), relevance (PMI of prompt and completion under the unsteered model) and "
                       "repetition (distinct-2), for the steering and for a random vector of equal norm, beside the "
                       "unsteered baseline; and the fluency and relevance scores against unsteered, with their "
                       "harmonic mean with the topic share.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--add", nargs=2, action="append", metavar=("PROMPT", "WEIGHT"),
                      help="ActAdd prompt and its weight; the cell's coefficient multiplies the weights "
                      "(repeat: --add ' weddings' 1 --add ' ' -1)")
    what.add_argument("--pair", nargs=2, action="append", metavar=("POSITIVE", "NEGATIVE"),
                      help="constant mode: last-token difference (repeat to average)")
    what.add_argument("--vector", help="a stored vector (name or id)")
    p.add_argument("--mode", choices=("actadd", "constant"), default="actadd", help="mode for --vector")
    p.add_argument("--positions", type=positions_arg, default="all",
                   help="constant mode's schedule (--pair, --vector --mode constant): all, prompt, generated, "
                   "after_anchor, or a window of generated tokens START:END (END may be empty: no end)")
    p.add_argument("--pad", metavar="TEXT|none", help="ActAdd pad (default: the server's)")
    p.add_argument("--bos", default="", metavar="TEXT",
                   help="written in front of every prompt and steering prompt (e.g. '<|endoftext|>' for SmolLM2)")
    p.add_argument("--layers", type=_numbers(int), help="comma-separated (required unless --vector: its own layers)")
    strength = p.add_mutually_exclusive_group(required=True)
    strength.add_argument("--coeffs", type=_numbers(float), help="comma-separated coefficients")
    strength.add_argument("--doses", type=_numbers(float),
                          help="comma-separated relative doses ‖Δh‖/‖h‖ (--vector only: a dose scales one vector)")
    p.add_argument("--prompts", type=Path, help="prompt file, one a line (default: the shipped neutral openings)")
    p.add_argument("--lexicon", type=Path, help="topic words, one a line (default: the shipped wedding lexicon)")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt and cell (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.3)
    p.add_argument("--repetition-penalty", type=float, default=1.2, help="0 to leave it out")
    p.add_argument("--seed", type=int, default=0, help="seeds the random floor (and the requests with --seeded)")
    p.add_argument("--seeded", action="store_true",
                   help="send per-prompt request seeds so every cell draws the same random numbers (vLLM 0.32's "
                   "CPU engine dies on a seeded request whose prefill is chunked: use on GPU or at low concurrency)")
    p.add_argument("--no-floor", action="store_true", help="skip the random-vector floor")
    _server_args(p)
    p.set_defaults(func=sweep_command)

    p = sub.add_parser("paper", help="the ActAdd paper's experiments on the served model; writes report.md")
    p.add_argument("--quick", action="store_true", help="fewer layers, prompts and samples (about 10 min on 2 cores)")
    p.add_argument("--bos", metavar="TEXT|none", help="BOS text to prepend (default: detected from the tokenizer)")
    _server_args(p)
    p.set_defaults(func=paper_command)
    return parser


def steering_from_args(args) -> Steering:
    bos = args.bos
    if args.add:
        pad = SERVER_PAD if args.pad is None else (None if args.pad.lower() == "none" else args.pad)
        return PromptAdditions(tuple((bos + prompt, _weight(weight)) for prompt, weight in args.add), pad)
    if args.pair:
        return ContrastPairs(tuple((bos + pos, bos + neg) for pos, neg in args.pair), args.positions)
    return NamedVector(args.vector, args.mode, args.positions)


def _weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise EvalError(f"--add: the weight must be a number, got {text!r}") from None


@contextmanager
def _progress():
    """A rich progress bar with one task per stage, fed by (done, total) hooks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=False) as progress:
        tasks = {}

        def factory(title: str):
            def hook(done: int, total: int) -> None:
                if title not in tasks:
                    tasks[title] = progress.add_task(title, total=total)
                progress.update(tasks[title], completed=done, total=total)
            return hook

        yield factory


async def _sweep(args) -> int:
    from rich.console import Console

    from steer_server.eval.report import table, write_outputs
    from steer_server.measure.sweep import SweepPlan, run_sweep

    if args.layers is None and args.vector is None:
        raise EvalError("--layers is required (only a --vector may be swept at its own layers)")
    prompts = data.read_prompts(args.prompts) if args.prompts else data.neutral_prompts()
    lexicon = Lexicon.from_file(args.lexicon) if args.lexicon else data.wedding_lexicon()
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty or None, samples=args.samples,
                        seeded=args.seeded)
    plan = SweepPlan(steering_from_args(args), tuple(args.bos + p for p in prompts),
                     tuple(args.layers) if args.layers else (None,), tuple(args.coeffs or args.doses), lexicon,
                     sampling, floor=not args.no_floor, seed=args.seed, strength="coeff" if args.coeffs else "dose")
    async with SteerClient(args.url, args.api_key, args.model) as client:
        with _progress() as factory:
            result = await run_sweep(client, plan, args.out, concurrency=args.concurrency, on_progress=factory("sweep"))
    written = write_outputs(result, args.out)
    console = Console()
    console.print(table(result))
    console.print("wrote " + ", ".join(str(p) for p in [args.out / "records.jsonl", *written]))
    return 0


async def _paper(args) -> int:
    from steer_server.eval.paper import PaperSettings, run_paper
    from steer_server.eval.paper_report import write_report

    settings = PaperSettings.quick() if args.quick else PaperSettings.full()
    bos = None if args.bos is None else ("" if args.bos.lower() == "none" else args.bos)
    async with SteerClient(args.url, args.api_key, args.model) as client:
        with _progress() as factory:
            result = await run_paper(client, settings, args.out, bos=bos, concurrency=args.concurrency,
                                     progress=factory)
    command = "steer-server eval " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:])
    report = write_report(result, args.out, command)
    print(f"wrote {report} ({result.seconds / 60:.1f} min); layer {result.layer}, coefficient {result.coeff:g}")
    return 0


def sweep_command(args) -> int:
    return asyncio.run(_sweep(args))


def paper_command(args) -> int:
    return asyncio.run(_paper(args))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EvalError, JournalMismatch, ValueError, OSError) as exc:
        print(f"steer-server eval: {exc}", file=sys.stderr)
        return 1
