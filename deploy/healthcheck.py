"""The container's health: a Dask scheduler or worker in it must answer on /health.

Checks the dashboards in DKM_HEALTH_URLS (default: the scheduler's :8787 and the
worker's :8788, as deploy/kubernetes/daskcluster.yaml starts them). Exit 0 when one
answers "ok"; 1 when one listens but does not, or when none listens and dkm cannot be
imported (a job container: nothing listens, dkm must work).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT = "http://127.0.0.1:8787/health http://127.0.0.1:8788/health"


def check(urls: list[str], timeout: float = 5.0) -> tuple[bool, str]:
    listening = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = response.read(64).decode(errors="replace").strip()
        except urllib.error.HTTPError as e:
            return False, f"{url} answered HTTP {e.code}"
        except (urllib.error.URLError, OSError):
            continue  # nothing listens there
        if body == "ok":
            return True, f"{url}: ok"
        listening.append(f"{url} answered {body!r}")
    if listening:
        return False, "; ".join(listening)
    try:
        import dkm
    except Exception as e:
        return False, f"no Dask server answers on {' '.join(urls)} and dkm does not import: {e}"
    return True, f"no Dask server here; dkm {dkm.__version__} imports"


def main() -> int:
    ok, message = check(os.environ.get("DKM_HEALTH_URLS", DEFAULT).split())
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
