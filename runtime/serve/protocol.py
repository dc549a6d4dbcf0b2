"""The live session protocol, version 1 (``WS /v1/live``), as data: message parsing, frame
packing and the error/close codes. ``docs/protocol.md`` is the description for client authors.

Binary video frame (server -> client)::

    [uint32 little-endian header length][UTF-8 JSON header][JPEG bytes][PCM s16le mono bytes]

header ``{"index": n, "pts": seconds, "speaking": bool, "jpeg_bytes": a, "pcm_bytes": b}``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 48_000
MAX_TEXT_BYTES = 4_096             # a control message larger than this is refused
MAX_AUDIO_BYTES = 1 << 20          # one binary PCM message: ~11 s at 48 kHz
CLOSE_BAD_MESSAGE = 1008           # policy violation: malformed, oversized or out-of-order message
CLOSE_TRY_AGAIN = 1013             # the server is full (--max-sessions) or cannot serve now
CONTROL_TYPES = ("interrupt", "end", "stop")
_LENGTH = struct.Struct("<I")


class ProtocolError(Exception):
    """A client message the protocol does not allow; ``code`` is the error code sent to the
    client, ``close_code`` the WebSocket close code that follows it."""

    def __init__(self, code: str, message: str, close_code: int = CLOSE_BAD_MESSAGE):
        super().__init__(message)
        self.code, self.message, self.close_code = code, message, close_code


@dataclass(frozen=True)
class StartMessage:
    """The first client message: ``{"type": "start", "avatar": ID, "sample_rate": Hz}``."""

    avatar: str
    sample_rate: int


def _json_object(text: str) -> dict[str, Any]:
    if len(text.encode()) > MAX_TEXT_BYTES:
        raise ProtocolError("too_large", f"text messages are limited to {MAX_TEXT_BYTES} bytes")
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"not JSON: {exc.msg} at position {exc.pos}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("bad_message", 'a text message must be a JSON object with a string "type"')
    return msg


def parse_start(text: str | None) -> StartMessage:
    """Parse the first message (``None``: it was binary).

    Raises:
        ProtocolError: not a start message, no avatar id, or a sample rate outside 8-48 kHz.
    """
    if text is None:
        raise ProtocolError("expected_start", 'the first message must be text: {"type":"start",...}')
    msg = _json_object(text)
    if msg["type"] != "start":
        raise ProtocolError("expected_start", f'the first message must have type "start", got "{msg["type"]}"')
    avatar, rate = msg.get("avatar"), msg.get("sample_rate")
    if not isinstance(avatar, str) or not avatar:
        raise ProtocolError("bad_start", '"avatar" must be the id of a prepared avatar (a string)')
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError("bad_sample_rate", f'"sample_rate" must be an integer in {MIN_SAMPLE_RATE}..'
                                               f'{MAX_SAMPLE_RATE} Hz, got {rate!r}')
    return StartMessage(avatar=avatar, sample_rate=rate)


def parse_control(text: str) -> str:
    """The type of a control message after start: ``interrupt``, ``end`` or ``stop``.

    Raises:
        ProtocolError: malformed, oversized or of another type.
    """
    kind = _json_object(text)["type"]
    if kind not in CONTROL_TYPES:
        raise ProtocolError("bad_message", f'unknown message type "{kind}" (expected one of {", ".join(CONTROL_TYPES)})')
    return kind


def check_audio(data: bytes) -> None:
    """Refuse a PCM message over :data:`MAX_AUDIO_BYTES` (``ProtocolError``)."""
    if len(data) > MAX_AUDIO_BYTES:
        raise ProtocolError("too_large", f"binary audio messages are limited to {MAX_AUDIO_BYTES} bytes, "
                                         f"got {len(data)}")


def ready_message(session: str, fps: float, width: int, height: int, lookahead_ms: float) -> str:
    """The server's answer to start (text JSON)."""
    return json.dumps({"type": "ready", "session": session, "fps": fps, "width": width, "height": height,
                       "lookahead_ms": lookahead_ms, "protocol": PROTOCOL_VERSION})


def speech_dropped_event(code: str, message: str, index: int) -> dict[str, Any]:
    """The event telling a client that its speech was dropped by a failed model step
    (``code``: ``out_of_memory`` or ``render_failed``); frames from ``index`` on are idle until
    it speaks again. The session stays open. Sent as text JSON."""
    return {"type": "speech_dropped", "code": code, "message": message, "index": index}


def error_message(code: str, message: str) -> str:
    """``{"type": "error", "code": ..., "message": ...}`` (text JSON), sent before a close."""
    return json.dumps({"type": "error", "code": code, "message": message})


def pack_frame(index: int, pts: float, speaking: bool, jpeg: bytes, pcm: bytes) -> bytes:
    """One binary frame message (layout in the module docstring)."""
    header = json.dumps({"index": index, "pts": round(pts, 6), "speaking": speaking, "jpeg_bytes": len(jpeg),
                         "pcm_bytes": len(pcm)}, separators=(",", ":")).encode()
    return b"".join((_LENGTH.pack(len(header)), header, jpeg, pcm))


def unpack_frame(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, JPEG bytes, PCM bytes) of one binary frame message.

    Raises:
        ValueError: the lengths in the message do not add up.
    """
    if len(data) < _LENGTH.size:
        raise ValueError("frame message shorter than its length prefix")
    (n,) = _LENGTH.unpack_from(data)
    header = json.loads(data[_LENGTH.size:_LENGTH.size + n].decode())
    start = _LENGTH.size + n
    a, b = int(header["jpeg_bytes"]), int(header["pcm_bytes"])
    if start + a + b != len(data):
        raise ValueError(f"frame message of {len(data)} bytes, header says {start + a + b}")
    return header, data[start:start + a], data[start + a:]
