"""WebSocket frame (un)masking with one big-integer XOR.

Every frame a client sends is masked with 4 random bytes.  Autobahn's native
masker builds a CFFI object per frame, which costs more than the XOR itself
for the small frames a messaging router sees (about 7% of the server's time
under the direct-durable benchmark).  :class:`XorMasker` does the same job with
Python's arbitrary-precision integers: a handful of C-level operations per
chunk, whatever its length.  :func:`install` makes Autobahn use it.
"""

from __future__ import annotations


class XorMasker:
    """XOR ``data`` with a repeating 4-byte ``mask``, across several chunks.

    Same interface as Autobahn's maskers: ``process`` may be called several
    times for one frame; ``pointer`` is how many bytes went through.
    """

    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask: bytes, length: int | None = None) -> None:
        if len(mask) != 4:
            raise ValueError("a WebSocket mask is 4 bytes")
        self._mask = bytes(mask)
        self._ptr = 0

    def pointer(self) -> int:
        return self._ptr

    def reset(self) -> None:
        self._ptr = 0

    def process(self, data: bytes) -> bytes:
        n = len(data)
        if n == 0:
            return b""
        shift = self._ptr & 3
        mask = self._mask[shift:] + self._mask[:shift]
        key = (mask * ((n >> 2) + 1))[:n]
        self._ptr += n
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def create_xor_masker(mask: bytes, length: int | None = None) -> XorMasker:
    """Autobahn's factory signature."""
    return XorMasker(mask, length)


def install() -> None:
    """Make Autobahn's WebSocket protocol (server and client) use :class:`XorMasker`."""
    from autobahn.websocket import protocol

    protocol.create_xor_masker = create_xor_masker
