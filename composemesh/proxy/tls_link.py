"""TLS over an open TCP transport, as a transport of its own: what the data path speaks mTLS with.

``TlsLink`` sits between a plain asyncio transport (below) and the data path's protocols
(above), encrypting with an ``ssl.SSLObject`` over memory BIOs. Why not ``loop.start_tls``
or ``create_connection(ssl=...)``:

- the inbound listener reads a connection's first bytes before it knows whether they start
  a TLS handshake; ``TlsLink`` takes those bytes (``data_received``) where ``start_tls``
  cannot;
- TCP half-close must pass through a mesh hop (a client that sends a request, then
  ``shutdown(SHUT_WR)``, then reads the answer). asyncio's SSL transports cannot write EOF;
  here ``write_eof`` flushes the records and sends a TCP FIN, and the other end reads that,
  after the last whole record, as end of stream while both can still send the other way
  (the FIN is not shown to OpenSSL, which would fail the session for a missing
  close_notify). A FIN inside a record is not a clean end: the connection is reset.
  ``close`` sends close_notify first, unless our direction was ended by ``write_eof``
  already: nothing can follow that FIN, so the link is closed without one.
- the protocol above may change (an upgraded HTTP connection becomes a tunnel) while a read
  delivers records: each record goes to the protocol in place when it is delivered, never to
  the one that was there when the read began.

The handshake's outcome is the future ``handshake``; whoever made the link checks the peer
(``ssl_object``) and then ``attach``es the protocol above. Nothing is delivered upward
before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any, cast

READ_CHUNK = 256 * 1024


class TlsLink(asyncio.Protocol, asyncio.Transport):
    """The protocol of the TCP transport below, and the transport of the protocol above."""

    __slots__ = ("sslobj", "incoming", "outgoing", "raw", "app", "handshake", "_paused",
                 "_eof_in", "_eof_out", "_closing", "_reading_scheduled", "_timer")

    raw: asyncio.Transport

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 handshake_timeout: float = 10.0, server_hostname: str | None = None) -> None:
        asyncio.Transport.__init__(self)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                       server_hostname=server_hostname)
        self.app: asyncio.Protocol | None = None
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self._paused = False  # the protocol above paused reading
        self._eof_in = False  # the peer's end of stream was seen
        self._eof_out = False  # we sent our FIN: nothing more goes out
        self._closing = False
        self._reading_scheduled = False
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            handshake_timeout, self._handshake_timeout)

    # ------------------------------------------------------------------ the transport below

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        if not self.sslobj.server_side:
            self._shake()  # the client speaks first

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.handshake.done():
            self._shake()
        elif self.app is not None and not self._paused:
            self._read()

    def eof_received(self) -> bool:
        # Not passed to OpenSSL: a FIN without close_notify would put the TLS session in
        # error, and the other direction must stay open (half-close). The stream ends once
        # every whole record before the FIN is read.
        self._eof_in = True
        if not self.handshake.done():
            self._fail(ConnectionResetError("the peer closed during the TLS handshake"))
            return False
        if self.app is not None and not self._paused:
            self._read()
        return True  # the protocol above decides when to close

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if not self.handshake.done():
            self._fail(exc or ConnectionResetError("closed during the TLS handshake"))
            return
        if self.app is not None:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # ------------------------------------------------------------------ handshake

    def _shake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._flush()  # the alert that tells the peer why
            self._fail(exc)
            return
        self._flush()
        self._cancel_timer()
        self.handshake.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._cancel_timer()
        if not self.handshake.done():
            self.handshake.set_exception(exc)
            self.handshake.exception()  # retrieved: no "never retrieved" warning if unawaited
        if not self.raw.is_closing():
            self.raw.close()

    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.handshake.done():
            self._fail(TimeoutError("TLS handshake timed out"))
            self.raw.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def attach(self, protocol: asyncio.Protocol) -> None:
        """After a good handshake: ``protocol`` reads and writes through this link from now."""
        self.app = protocol
        protocol.connection_made(self)
        if self.incoming.pending or self._eof_in:
            self._schedule_read()

    def adopt(self, protocol: asyncio.Protocol) -> None:
        """Like ``attach`` for a protocol that already holds this link as its transport."""
        self.app = protocol
        if self.incoming.pending or self._eof_in:
            self._schedule_read()

    # ------------------------------------------------------------------ reading

    def _read(self) -> None:
        sslobj = self.sslobj
        try:
            while not self._paused:
                data = sslobj.read(READ_CHUNK)
                if not data:
                    break
                # read self.app each time: a record may hand the link to another protocol
                # (an upgrade's tunnel), and the records after it are that one's
                self.app.data_received(data)  # type: ignore[union-attr]
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify: the peer's end of stream
            self._eof_in = True
        except (ssl.SSLError, OSError):
            self.raw.abort()
            return
        if self.outgoing.pending:  # post-handshake messages (tickets, key updates)
            self._flush()
        if self._eof_in and not self._paused:
            if self.incoming.pending:  # a record cut short by the FIN: not a clean end
                self.raw.abort()
                return
            self._end_of_stream()

    def _end_of_stream(self) -> None:
        app = self.app
        if app is None or self._closing:
            return
        self._eof_in = False  # told once
        keep_open = app.eof_received()
        if not keep_open:
            self.close()

    def _schedule_read(self) -> None:
        if not self._reading_scheduled:
            self._reading_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_read)

    def _scheduled_read(self) -> None:
        self._reading_scheduled = False
        if self.app is not None and not self._paused and not self.raw.is_closing():
            self._read()

    # ------------------------------------------------------------------ the transport above

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_out or not data:
            return
        try:
            self.sslobj.write(data)
        except (ssl.SSLError, OSError, ValueError):
            self.raw.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        """Flush, then end our direction with a TCP FIN under the TLS records."""
        if self._eof_out:
            return
        self._flush()
        self._eof_out = True
        if not self.raw.is_closing():
            self.raw.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._eof_out:  # after our FIN there is no room for a close_notify
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                self.sslobj.unwrap()  # queue a close_notify; the peer's reply is not awaited
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        self._closing = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self.raw.is_closing()

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self.raw.resume_reading()
            if self.app is not None and (self.incoming.pending or self._eof_in
                                         or self.sslobj.pending()):
                self._schedule_read()

    def is_reading(self) -> bool:
        return not self._paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size() + self.outgoing.pending

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.app = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self.app)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        if name == "peercert":
            return self.sslobj.getpeercert()
        if name == "cipher":
            return self.sslobj.cipher()
        return self.raw.get_extra_info(name, default)

    def _flush(self) -> None:
        if self.outgoing.pending:
            data = self.outgoing.read()
            # after our FIN (write_eof) the TCP stream is over: what OpenSSL still has to say
            # (a session ticket, a key update's answer) cannot be sent, and need not be
            if not self._eof_out and not self.raw.is_closing():
                self.raw.write(data)
