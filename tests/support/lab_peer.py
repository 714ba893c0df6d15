"""The destination host of the kernel tests, run inside the test's network
namespace: TCP echo on the given ports and UDP echo, IPv4 and IPv6.

usage: lab_peer.py PORT[,PORT...]   (every port is served on TCP and UDP)
Prints "ready" once every socket listens.
"""

import selectors
import socket
import sys


def main() -> None:
    ports = [int(p) for p in sys.argv[1].split(",")]
    sel = selectors.DefaultSelector()
    for port in ports:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET6, kind)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", port))
            if kind == socket.SOCK_STREAM:
                s.listen(128)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, ("listen" if kind == socket.SOCK_STREAM else "udp"))
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            s, role = key.fileobj, key.data
            try:
                if role == "listen":
                    conn, _ = s.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                elif role == "udp":
                    data, addr = s.recvfrom(65535)
                    s.sendto(data, addr)
                else:
                    data = s.recv(65535)
                    if not data:
                        sel.unregister(s)
                        s.close()
                    else:
                        s.sendall(data)
            except OSError:
                if role == "conn":
                    sel.unregister(s)
                    s.close()


if __name__ == "__main__":
    main()
