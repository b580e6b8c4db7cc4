"""The address a front end (`serve`, `ui`) listens on: checked before a model loads."""

from __future__ import annotations

import ipaddress
import socket

from ..errors import UserError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Fail in one sentence, before the model loads, when the address cannot be bound."""
    if not 1 <= port <= 65535:
        raise UserError(f"port {port} is not a TCP port (1-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except socket.gaierror:
            raise UserError(f"cannot listen on {host!r}: not an address or host name of this machine") from None
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server using it? "
                            "pick another with --port") from None
