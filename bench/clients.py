"""Raw-socket websocket clients that misbehave on purpose, shared by the reliability benchmark and the tests."""

from __future__ import annotations

import base64
import os
import socket


def stuck_client(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A real websocket client that completes the handshake and then never reads (small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    if sock.recv(12) != b"HTTP/1.1 101":
        sock.close()
        raise ConnectionError("the server refused the websocket handshake")
    return sock
