"""What a process with CAP_NET_RAW (a user's sudo) can make leave: source
routes on ordinary sockets and hand-made packets on raw ones. One action
per run, as a real process in the test cgroup; prints a JSON result.

usage: lab_raw.py lsrr DST HOP PORT          TCP connect to DST via HOP (IPv4 LSRR)
       lab_raw.py srh DST HOP PORT           TCP connect to DST via HOP (IPv6 segment routing header)
       lab_raw.py dstopts DST PORT           a UDP datagram and a TCP connect to DST:PORT, both
                                             behind an IPv6 destination options header
       lab_raw.py hdrincl SRC DST PORT FLAGS a TCP segment with FLAGS from an IPPROTO_RAW socket
       lab_raw.py rawtcp DST PORT...         an IPPROTO_TCP raw socket connected to DST:PORT[0] sends
                                             a SYN to each PORT, then with IP_HDRINCL a UDP
                                             datagram to the last one
"""

import errno
import ipaddress
import json
import socket
import struct
import sys

IPV6_RTHDR = 57
SRH_TYPE = 4


def result(ok: bool, err: OSError | None = None) -> dict:
    return {"ok": ok, "errno": errno.errorcode.get(err.errno) if err and err.errno else None}


def connect(s: socket.socket, addr: tuple) -> dict:
    s.settimeout(2.5)
    try:
        s.connect(addr)
        return result(True)
    except socket.timeout:
        return {"ok": False, "errno": "ETIMEDOUT"}
    except OSError as e:
        return result(False, e)
    finally:
        s.close()


def lsrr(dst: str, hop: str, port: str) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # NOP, then LSRR (type 0x83, length 7, pointer 4) naming the first hop;
    # the kernel appends the connect() address as the final destination.
    s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS,
                 bytes([1, 0x83, 7, 4]) + socket.inet_aton(hop))
    return connect(s, (dst, int(port)))


def srh(dst: str, hop: str, port: str) -> dict:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    # Two segments: [0] becomes the connect() address, [1] is the first hop.
    hdr = struct.pack("!BBBBBBH", 0, 4, SRH_TYPE, 1, 1, 0, 0)
    hdr += ipaddress.IPv6Address(dst).packed + ipaddress.IPv6Address(hop).packed
    s.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, hdr)
    return connect(s, (dst, int(port)))


def dstopts(dst: str, port: str) -> dict:
    # Next header and length are filled in by the kernel; one PadN option.
    opts = bytes([0, 0, 1, 4, 0, 0, 0, 0])
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, opts)
    out = {"udp": send(u, b"opts", (dst, int(port)))}
    t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, opts)
    out["tcp"] = connect(t, (dst, int(port)))
    return out


def tcp_header(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, flags, 65535, 0, 0)


def send(s: socket.socket, data: bytes, addr: tuple) -> dict:
    try:
        s.sendto(data, addr)
        return result(True)
    except OSError as e:
        return result(False, e)


def hdrincl(src: str, dst: str, port: str, flags: str) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    tcp = tcp_header(40000, int(port), int(flags, 0))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return send(s, ip + tcp, (dst, 0))


def rawtcp(dst: str, *ports: str) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    # The port is kept as the socket's destination port (inet_dport),
    # though a raw socket's packets carry whatever header they are given.
    s.connect((dst, int(ports[0])))
    sent = {}
    for port in ports:
        sent[f"syn {port}"] = send(s, tcp_header(40001, int(port), 0x02), (dst, 0))
    src = s.getsockname()[0]
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    udp = struct.pack("!HHHH", 40002, int(ports[-1]), 8 + 4, 0) + b"leak"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 2, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    sent[f"udp {ports[-1]}"] = send(s, ip + udp, (dst, 0))
    return sent


def main() -> None:
    action, args = sys.argv[1], sys.argv[2:]
    print(json.dumps({"lsrr": lsrr, "srh": srh, "dstopts": dstopts, "hdrincl": hdrincl, "rawtcp": rawtcp}[action](*args)))


if __name__ == "__main__":
    main()
