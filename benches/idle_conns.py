#!/usr/bin/env python3
"""Open N keep-alive HTTP/1.1 connections, do one request on each, then hold them idle.

Used by benches/load.sh to measure a proxy's memory per idle client connection:

    idle_conns.py --host 10.99.0.2 --port 15006 --conns 10000 --path /1k

Each connection sends one `GET <path>` (keep-alive), reads the whole response
(Content-Length or chunked) and then stays open without sending anything more.
Once every connection has finished its request the script prints one line

    READY ok=<n> failed=<m> [first error: ...]

to stdout and holds the sockets until it gets SIGTERM/SIGINT (or --hold seconds
pass).  Each connection the peer closes while held prints `CLOSED <total>`, so
the caller can tell whether the proxy dropped idle connections during the
measurement.  Exit status: 0 when every connection succeeded, 1 otherwise.
"""

import argparse
import asyncio
import resource
import signal
import sys


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        print(f"warning: RLIMIT_NOFILE is {soft}, below the {needed} needed", file=sys.stderr, flush=True)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Read one HTTP/1.1 response; return (status, body bytes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if headers.get("connection", "").lower() == "close":
        raise ConnectionError("server answered Connection: close")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # trailers (usually none): read lines until the empty one
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return status, total
            await reader.readexactly(size + 2)
            total += size
    length = int(headers.get("content-length", "0"))
    await reader.readexactly(length)
    return status, length


class Holder:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ok = 0
        self.failed = 0
        self.closed = 0
        self.first_error = ""
        self.ready = False
        self.conns: list[asyncio.StreamWriter] = []
        self.sem = asyncio.Semaphore(args.concurrency)
        self.request = (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.host_header or args.host}\r\n"
            "User-Agent: baton-idle-conns\r\nAccept: */*\r\n\r\n"
        ).encode()

    def fail(self, err: str) -> None:
        self.failed += 1
        if not self.first_error:
            self.first_error = err

    async def one(self) -> None:
        async with self.sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.args.host, self.args.port), self.args.timeout
                )
            except Exception as e:  # noqa: BLE001 - report any failure
                self.fail(f"connect: {e!r}")
                return
            try:
                writer.write(self.request)
                status, _ = await asyncio.wait_for(read_response(reader), self.args.timeout)
                if not 200 <= status < 300:
                    raise ConnectionError(f"status {status}")
            except Exception as e:  # noqa: BLE001
                self.fail(f"request: {e!r}")
                writer.close()
                return
            self.ok += 1
            self.conns.append(writer)
        # Hold: wait for the peer to close (EOF/reset) or for cancellation.
        try:
            data = await reader.read(1)
        except Exception:  # noqa: BLE001
            data = b""
        if not data:
            self.closed += 1
            if self.ready:
                print(f"CLOSED {self.closed}", flush=True)


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument("--path", default="/1k")
    p.add_argument("--host-header", default="")
    p.add_argument("--concurrency", type=int, default=200, help="connections being set up at once")
    p.add_argument("--timeout", type=float, default=10.0, help="per connect / per request, seconds")
    p.add_argument("--hold", type=float, default=0.0, help="seconds to hold after READY (0 = until signalled)")
    args = p.parse_args()
    raise_nofile(args.conns + 64)

    h = Holder(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    tasks = [asyncio.create_task(h.one()) for _ in range(args.conns)]
    setup = asyncio.create_task(wait_setup(h, args.conns))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({setup, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        h.ready = True
        extra = f" first_error={h.first_error}" if h.first_error else ""
        early = f" closed_during_setup={h.closed}" if h.closed else ""
        print(f"READY ok={h.ok} failed={h.failed}{early}{extra}", flush=True)
        if args.hold > 0:
            try:
                await asyncio.wait_for(stop.wait(), args.hold)
            except asyncio.TimeoutError:
                pass
        else:
            await stop.wait()
    for t in tasks:
        t.cancel()
    for w in h.conns:
        w.transport.abort()
    await asyncio.gather(*tasks, return_exceptions=True)
    setup.cancel()
    stopper.cancel()
    return 0 if h.failed == 0 and h.ok == args.conns else 1


async def wait_setup(h: Holder, n: int) -> None:
    while h.ok + h.failed < n:
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
