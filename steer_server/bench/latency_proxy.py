"""A TCP proxy that holds everything a client sends for a fixed delay before passing it on.

Put between a server and its Redis vector store, it adds the delay to every Redis command's
round trip (replies pass straight back), as a store across a network would, with a
redis-server that itself stays local and real. Bytes of one connection keep their order; a
read that carries several pipelined commands is delayed once, as on a slow link.

Why a user-space proxy and not ``tc netem`` in a network namespace: netem needs CAP_NET_ADMIN
and the ``sch_netem`` kernel module, which containers and CI machines often lack, and a delay on
an interface would also slow the bench's own HTTP traffic unless the store got a namespace of
its own. The proxy needs neither; its timers wake at or after the due time (the event loop's
epoll timeout has millisecond granularity and rounds up), so the delay is a lower bound that
a loaded machine can only lengthen, which the bench reports by measuring it.

Run: ``python -m steer_server.bench.latency_proxy --port P --upstream HOST:PORT --delay-ms D``.
On SIGINT or SIGTERM it prints one JSON line of totals (connections, forwarded reads, bytes)
and exits.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import asdict, dataclass


@dataclass
class Totals:
    connections: int = 0
    forwarded_reads: int = 0
    forwarded_bytes: int = 0


async def _delayed_copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                        totals: Totals) -> None:
    """Copy reader -> writer, each read released ``delay_s`` after it arrived, in order."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await pending.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            totals.forwarded_reads += 1
            totals.forwarded_bytes += len(data)

    releasing = asyncio.create_task(release())
    try:
        while data := await reader.read(65536):
            pending.put_nowait((loop.time() + delay_s, data))
        pending.put_nowait((loop.time() + delay_s, b""))
        await releasing
    finally:
        releasing.cancel()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def serve(port: int, upstream_host: str, upstream_port: int, delay_s: float, totals: Totals,
                stop: asyncio.Event, host: str = "127.0.0.1") -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        totals.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(_delayed_copy(client_reader, upstream_writer, delay_s, totals),
                                 _copy(upstream_reader, client_writer))
        except (ConnectionError, OSError):
            pass  # either side went away: close both
        finally:
            for writer in (upstream_writer, client_writer):
                writer.close()

    server = await asyncio.start_server(handle, host, port)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steer_server.bench.latency_proxy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT", help="where to forward (e.g. a redis-server)")
    parser.add_argument("--delay-ms", type=float, required=True, help="delay added to everything a client sends")
    args = parser.parse_args(argv)
    upstream_host, _, upstream_port = args.upstream.rpartition(":")
    totals = Totals()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.port, upstream_host, int(upstream_port), args.delay_ms / 1000.0, totals, stop)

    asyncio.run(run())
    print(json.dumps(asdict(totals)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
