#!/usr/bin/python3
"""A socket-activated HTTP server for the skactivate examples.

systemd passes the listening socket as fd 3 (webserver.socket). Every request
is answered with one line naming the service and the local address the
connection reached, e.g. "webserver 192.0.2.7:80", so a test can see which
service answered and that it saw the original destination address.

Usage: webserver.py NAME   (the units pass %N, the unit name without suffix)
"""

import http.server
import ipaddress
import os
import socket
import sys

SD_LISTEN_FDS_START = 3


def listening_socket():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        sys.exit("webserver.py: expected exactly one socket from systemd (LISTEN_FDS=1)")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM:
        sys.exit("webserver.py: fd 3 is not a stream socket")
    return sock


def reached(sock):
    """The local address a connection reached, IPv4-mapped IPv6 shown as IPv4."""
    host, port = sock.getsockname()[:2]
    addr = ipaddress.ip_address(host.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    timeout = 5

    def do_GET(self):
        body = f"{self.server.name} {reached(self.connection)}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format, *args):
        # One journal line per request would flood the journal under load.
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: webserver.py NAME")
    sock = listening_socket()
    server = Server(sock.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.address_family = sock.family
    server.name = sys.argv[1]
    print(f"{server.name}: serving HTTP on {reached(sock)} (fd 3 from systemd)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
