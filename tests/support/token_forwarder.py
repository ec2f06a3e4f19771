"""A byte-transparent TCP forwarder that adds `Authorization: Bearer <token>` to each request.

Stands in for the bearer token a real client would send: the public MCP conformance suite has
no option to send one, so the conformance test puts this in front of the gateway. Everything
else passes unchanged, byte for byte (header order, case, whitespace, Host, Origin; answers
and SSE streams as they come), so what the suite checks is the gateway's behaviour, not the
forwarder's. A request that already carries an Authorization header keeps it.

    python -m tests.support.token_forwarder --port N --target PORT --token-file FILE
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

MAX_HEAD = 1 << 20


async def _body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The request body after `head`, as it came (Content-Length or chunked; none otherwise)."""
    lines = head.split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    if b"chunked" in fields.get(b"transfer-encoding", b""):
        out = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    out += trailer
                return out + b"\r\n"
            out += await reader.readexactly(size + 2)
    length = fields.get(b"content-length", b"0")
    return await reader.readexactly(int(length)) if length.isdigit() else b""


async def _requests(client: asyncio.StreamReader, upstream: asyncio.StreamWriter, token: bytes) -> None:
    try:
        while True:
            head = await client.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEAD:
                break
            if not any(line.lower().startswith(b"authorization:") for line in head.split(b"\r\n")[1:]):
                request_line, _, rest = head.partition(b"\r\n")
                head = request_line + b"\r\nAuthorization: Bearer " + token + b"\r\n" + rest
            upstream.write(head + await _body(client, head))
            await upstream.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        if not upstream.is_closing():
            upstream.write_eof() if upstream.can_write_eof() else upstream.close()


async def _answers(upstream: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
    try:
        while chunk := await upstream.read(65536):
            client.write(chunk)
            await client.drain()
    except ConnectionError:
        pass
    finally:
        client.close()


def serve(port: int, target: int, token_file: Path) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        token = token_file.read_text().strip().encode()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_requests(reader, up_writer, token), _answers(up_reader, writer))
        up_writer.close()

    async def main() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", port, limit=MAX_HEAD)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    args = parser.parse_args()
    serve(args.port, args.target, args.token_file)
