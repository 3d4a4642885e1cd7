#!/usr/bin/python3
"""A socket-activated UDP echo server for the skactivate examples.

systemd passes the datagram socket as fd 3 (echo-udp.socket, with
PassPacketInfo=yes). Each datagram is answered with "NAME:" followed by the
datagram, sent FROM the address the datagram was sent to: with sk_lookup one
socket receives traffic for a whole prefix, and a client only accepts a reply
from the address it asked. The destination address comes from IP_PKTINFO /
IPV6_PKTINFO ancillary data and goes back as the source in sendmsg().

Usage: echo-udp.py NAME   (the units pass %N, the unit name without suffix)
"""

import os
import socket
import struct
import sys

SD_LISTEN_FDS_START = 3
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python < 3.12 lacks it
IPV6_RECVPKTINFO = socket.IPV6_RECVPKTINFO
IPV6_PKTINFO = socket.IPV6_PKTINFO
CMSG_SPACE = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(12)


def datagram_socket():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        sys.exit("echo-udp.py: expected exactly one socket from systemd (LISTEN_FDS=1)")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_DGRAM:
        sys.exit("echo-udp.py: fd 3 is not a datagram socket")
    # PassPacketInfo=yes already asks for it; asking again makes the server
    # correct on its own.
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    return sock


def reply_source(ancdata):
    """The ancillary data that makes the reply leave from the address asked."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
            # struct in6_pktinfo { struct in6_addr addr; int ifindex; }
            # Over a dual-stack socket IPv4 arrives as ::ffff:a.b.c.d, which
            # the kernel accepts back as the IPv4 source.
            return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, data[:16] + struct.pack("@i", 0))]
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            # struct in_pktinfo { int ifindex; struct in_addr spec_dst, addr; }
            _, _, addr = struct.unpack("@i4s4s", data[:12])
            return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("@i4s4s", 0, addr, b"\0" * 4))]
    return []


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: echo-udp.py NAME")
    name = sys.argv[1].encode()
    sock = datagram_socket()
    print(f"{sys.argv[1]}: echoing UDP on {sock.getsockname()[:2]} (fd 3 from systemd)", flush=True)
    while True:
        data, ancdata, _, peer = sock.recvmsg(65535, CMSG_SPACE)
        try:
            sock.sendmsg([name + b":" + data], reply_source(ancdata), 0, peer)
        except OSError as e:
            print(f"{sys.argv[1]}: reply to {peer}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
