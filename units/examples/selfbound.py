#!/usr/bin/python3
"""A daemon that binds its own sockets, for the skactivate examples.

Unlike webserver.py it takes nothing from systemd: it binds every address
given on the command line itself, as nginx or haproxy do, and tells systemd
it is ready (Type=notify) once all are bound. skactivate register-pid takes
the sockets out of it; the generator runs that from ExecStartPost= when the
service has X-SkLookup= in [Service].

TCP sockets answer every HTTP request with one line naming the service and
the local address the connection reached ("selfbound 203.0.113.9:80"); UDP
sockets answer every datagram with "NAME: " and the datagram.

Usage: selfbound.py NAME [--reuseport N] [--high-fds] [--noise] [tcp:|udp:]ADDRESS:PORT...

  --reuseport N  bind N sockets with SO_REUSEPORT to each address (a group)
  --high-fds     move each socket to fd 1000 and up (a sparse fd table)
  --noise        also hold what register-pid must leave alone: a connected
                 UDP socket, a UNIX socket pair, a pipe and an established
                 TCP connection
"""

import http.server
import ipaddress
import os
import socket
import sys
import threading


def parse_address(text):
    proto = "tcp"
    if text.startswith(("tcp:", "udp:")):
        proto, text = text[:3], text[4:]
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return proto, family, host, int(port)


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
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def serve_tcp(sock, name):
    server = Server(sock.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.address_family = sock.family
    server.name = name
    server.serve_forever()


def serve_udp(sock, name):
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(name.encode() + b": " + data, peer)


def moved(sock, fd):
    """The socket, renumbered to fd."""
    os.dup2(sock.fileno(), fd)
    new = socket.socket(fileno=fd)
    sock.close()
    return new


def notify(state):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    name, args = args[0], args[1:]
    reuseport, high, noise, addresses = 1, False, False, []
    while args:
        a = args.pop(0)
        if a == "--reuseport":
            reuseport = int(args.pop(0))
        elif a == "--high-fds":
            high = True
        elif a == "--noise":
            noise = True
        else:
            addresses.append(parse_address(a))
    held = []
    next_fd = 1000
    for proto, family, host, port in addresses:
        for _ in range(reuseport):
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            s = socket.socket(family, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport > 1:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            if proto == "tcp":
                s.listen(64)
            if high:
                s = moved(s, next_fd)
                next_fd += 7
            serve = serve_tcp if proto == "tcp" else serve_udp
            threading.Thread(target=serve, args=(s, name), daemon=True).start()
            held.append(s)
    if noise:
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.connect(("127.0.0.1", 9))
        held += [c, *socket.socketpair()]
        held += [os.pipe()]
        if addresses and addresses[0][0] == "tcp":
            _, family, host, port = addresses[0]
            peer = socket.create_connection((host, port))
            held.append(peer)
    print(f"{name}: bound " + " ".join(f"{p}:{h}:{n}" for p, _, h, n in addresses), flush=True)
    notify("READY=1")
    threading.Event().wait()


if __name__ == "__main__":
    main()
