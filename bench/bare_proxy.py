"""The baseline: a bare aiohttp reverse proxy, the least any Python gateway must do.

One pooled ClientSession; per request it reads the body, sends method, path,
query, headers and body upstream, reads the answer and returns status, body
and headers minus hop-by-hop ones. No rules, no store, no logging: whatever
Cosigner costs on top of this is what `make bench` reports.

    python bench/bare_proxy.py --listen 127.0.0.1:9000 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

# Hop-by-hop headers (RFC 9110 §7.6.1), plus what aiohttp computes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Also dropped from answers: aiohttp decodes bodies and sets its own Date and Server.
RESPONSE_DROP = HOP_BY_HOP | {"content-encoding", "date", "server"}
UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)


async def forward(request: web.Request) -> web.Response:
    """Send the request upstream as it came; answer with what came back."""
    body = await request.read()
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    try:
        async with request.app[SESSION].request(
            request.method,
            url,
            headers=headers,
            data=body or None,
            allow_redirects=False,
            timeout=TIMEOUT,
        ) as resp:
            data = await resp.read()
            out = CIMultiDict(
                (k, v) for k, v in resp.headers.items() if k.lower() not in RESPONSE_DROP
            )
            return web.Response(status=resp.status, body=data, headers=out)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.Response(status=502, text=f"upstream error: {exc}")


def build_app(upstream: str) -> web.Application:
    """The proxy application, with its one pooled client session."""
    app = web.Application(client_max_size=1_048_576)
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # The same pool limits as Cosigner's upstream session.
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, ttl_dns_cache=300),
            trust_env=False,
            auto_decompress=True,
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:9000", help="host:port")
    parser.add_argument("--upstream", required=True, help="http://host:port")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (bench/run.py picks the one Cosigner runs on)",
    )
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    print(f"bare proxy: http://{args.listen} -> {args.upstream} ({args.loop})", flush=True)
    web.run_app(
        build_app(args.upstream),
        host=host,
        port=int(port),
        print=None,
        access_log=None,
        shutdown_timeout=2,
        loop=loop,
    )


if __name__ == "__main__":
    main()
