"""An HTTP CONNECT proxy for tests, on 127.0.0.1, that tunnels to 127.0.0.1 only.

Usage: python deploy_proxy.py PORT LOG. Each tunnel is logged as JSON lines in LOG.
After SIGUSR1 the proxy cuts the next request that a client sends: it passes
half of the bytes on and then drops the tunnel, as a failing hospital link
would, so the server sees a request that stops in the middle.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path


class Proxy:
    """Tunnels CONNECT requests to loopback and cuts one request after SIGUSR1."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.tunnels: dict[int, list[asyncio.StreamWriter]] = {}
        self.count = 0
        self.armed = False

    def record(self, **event: object) -> None:
        with self.log.open("a") as handle:
            handle.write(json.dumps(event) + "\n")

    def arm(self) -> None:
        """Cut the next request a client sends through any tunnel."""
        self.armed = True
        self.record(event="armed")

    async def handle(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or host not in ("127.0.0.1", "localhost"):
            writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", int(port))
        self.count += 1
        tunnel = self.count
        self.tunnels[tunnel] = [writer, upstream_writer]
        self.record(event="connect", tunnel=tunnel, target=target)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        sizes = await asyncio.gather(
            self.pipe(reader, upstream_writer, writer, tunnel),
            self.pipe(upstream_reader, writer, None, tunnel))
        self.tunnels.pop(tunnel, None)
        self.record(event="closed", tunnel=tunnel, up=sizes[0], down=sizes[1])

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   client: asyncio.StreamWriter | None, tunnel: int) -> int:
        """Copy one direction; ``client`` is set for the client-to-server one."""
        total = 0
        try:
            while data := await reader.read(65536):
                if client is not None and self.armed:
                    self.armed = False
                    writer.write(data[:len(data) // 2])
                    await writer.drain()
                    self.record(event="cut", tunnel=tunnel, sent=len(data) // 2,
                                of=len(data))
                    client.transport.abort()
                    break
                total += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
        return total


async def main(port: int, log: Path) -> None:
    proxy = Proxy(log)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", port)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, proxy.arm)
    proxy.record(event="listening", port=port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
