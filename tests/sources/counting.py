"""Test servers that count the body bytes they send, per request path.

``counting(servers.GcsProxy)`` is a GcsProxy whose ``bytes_sent(match)`` says how many
response-body bytes went out for paths containing ``match`` (URL-decoded), counted at
the socket, so a body cut by a ``drop`` fault counts only what was sent::

    Proxy = counting(servers.GcsProxy)
    with Proxy(emulator_port) as proxy:
      ...
      assert proxy.bytes_sent("model.safetensors") <= limit
"""

from __future__ import annotations

import collections
import threading
import urllib.parse
from typing import Any


class _CountingWriter:
  def __init__(self, raw: Any, handler: Any):
    self._raw, self._handler = raw, handler

  def write(self, data: bytes) -> int:
    handler = self._handler
    if handler.in_body:
      with handler.server.sent_lock:
        handler.server.sent[urllib.parse.unquote(handler.path)] += len(data)
    return self._raw.write(data)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._raw, name)


def counting(server_cls: type) -> type:
  """A subclass of a ``servers._Server`` class that counts body bytes per path."""

  class Handler(server_cls.handler):
    in_body = False

    def setup(self) -> None:
      super().setup()
      self.wfile = _CountingWriter(self.wfile, self)

    def _dispatch(self, method: str) -> None:
      self.in_body = False
      super()._dispatch(method)

    def end_headers(self) -> None:
      super().end_headers()
      self.in_body = True

  class Counting(server_cls):
    handler = Handler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
      super().__init__(*args, **kwargs)
      self.sent: collections.Counter[str] = collections.Counter()
      self.sent_lock = threading.Lock()

    def bytes_sent(self, match: str = "") -> int:
      """Body bytes sent for request paths containing ``match``."""
      with self.sent_lock:
        return sum(n for path, n in self.sent.items() if match in path)

    def reset_counts(self) -> None:
      with self.sent_lock:
        self.sent.clear()

  Counting.__name__ = f"Counting{server_cls.__name__}"
  return Counting
