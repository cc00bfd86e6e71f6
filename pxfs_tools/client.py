"""A small client of a node's REST API (used by pxctl and the launcher)."""

from __future__ import annotations

import httpx

from pxfs.errors import PxfsError


class ApiError(PxfsError):
    """The node answered with an error, or could not be reached."""


class Client:
    def __init__(self, base: str, timeout: float = 120.0):
        self.base = base.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None):
        try:
            resp = self._http.request(method, self.base + path, json=body)
        except httpx.TimeoutException:
            raise ApiError(f"pxfs node at {self.base} did not answer within {self.timeout:g} s "
                           "(PXCTL_TIMEOUT)", errno=110) from None
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach pxfs node at {self.base}: {exc}") from None
        try:
            data = resp.json()
        except ValueError:
            raise ApiError(f"{self.base}{path}: HTTP {resp.status_code}: {' '.join(resp.text[:200].split())}") from None
        if resp.status_code >= 400:
            raise ApiError(data.get("error", f"HTTP {resp.status_code}") if isinstance(data, dict)
                           else f"HTTP {resp.status_code}", errno=(data or {}).get("errno", 5))
        return data

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body=None):
        return self.request("POST", path, body)

    def delete(self, path):
        return self.request("DELETE", path)
