#!/usr/bin/env python3
"""Container health probe: exit 0 when a SuperLink or SuperNode answers GET /health with 200.

Run as ``python3 -I -S splitmix-health [URL] [--ca CA.pem]`` (``-S``: no site-packages, so
nothing but the standard library is imported; one check costs a few hundredths of a CPU
second, where ``splitmix deploy health`` imported the CLI: 2.3 s idle, 16 s on a busy host).
Defaults: ``$SPLITMIX_HEALTH_URL`` or a SuperNode's Runtime API ``http://127.0.0.1:9094/health``,
``$SPLITMIX_HEALTH_CA`` (an https URL is verified against it). The timeout is generous, so a
slow answer on a loaded host is still an answer; the container's HEALTHCHECK bounds the rest.
"""

import os
import ssl
import sys
import urllib.request


def main(argv: list[str]) -> int:
    url = os.environ.get("SPLITMIX_HEALTH_URL", "http://127.0.0.1:9094/health")
    ca = os.environ.get("SPLITMIX_HEALTH_CA") or None
    args = list(argv)
    if "--ca" in args:
        i = args.index("--ca")
        ca = args[i + 1] if i + 1 < len(args) else None
        del args[i : i + 2]
    if args:
        url = args[0]
    context = ssl.create_default_context(cafile=ca) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("SPLITMIX_HEALTH_TIMEOUT", "50")), context=context) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # unreachable, TLS failure, HTTP error: unhealthy, say why
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
