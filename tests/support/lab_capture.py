"""A packet capture inside the destination host's namespace: every frame
that reaches one link, through an AF_PACKET socket, summarised.

usage: lab_capture.py IFNAME
Prints "ready" once the socket listens; at the first line on stdin (or its
end) prints a JSON list of the IPv4/IPv6 packets seen, each
{"family", "src", "dst", "proto", "dport", "flags", "routed"}: ``flags``
is the TCP flags byte, ``routed`` whether an IPv4 option list or an IPv6
extension header was present before the transport header.
"""

import ipaddress
import json
import select
import socket
import struct
import sys

ETH_P_ALL = 0x0003
IPV6_EXT = {0, 43, 44, 51, 60, 135}


def summary(frame: bytes) -> dict | None:
    ethertype = struct.unpack("!H", frame[12:14])[0]
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        out = {"family": 4, "src": str(ipaddress.IPv4Address(ip[12:16])),
               "dst": str(ipaddress.IPv4Address(ip[16:20])), "proto": ip[9],
               "routed": ihl > 20}
        l4 = ip[ihl:]
    elif ethertype == 0x86DD and len(ip) >= 40:
        out = {"family": 6, "src": str(ipaddress.IPv6Address(ip[8:24])),
               "dst": str(ipaddress.IPv6Address(ip[24:40])), "routed": False}
        nxt, off = ip[6], 40
        while nxt in IPV6_EXT and off + 2 <= len(ip):
            out["routed"] = True
            hlen = 8 if nxt == 44 else ((ip[off + 1] + 2) * 4 if nxt == 51 else (ip[off + 1] + 1) * 8)
            nxt, off = ip[off], off + hlen
        out["proto"] = nxt
        l4 = ip[off:]
    else:
        return None
    out["dport"] = struct.unpack("!H", l4[2:4])[0] if out["proto"] in (6, 17) and len(l4) >= 4 else 0
    out["flags"] = l4[13] if out["proto"] == 6 and len(l4) >= 14 else 0
    return out


def main() -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((sys.argv[1], 0))
    print("ready", flush=True)
    seen = []
    while True:
        ready, _, _ = select.select([s, sys.stdin], [], [])
        if sys.stdin in ready:
            break
        frame, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING:
            continue                       # the peer's own replies
        pkt = summary(frame)
        if pkt:
            seen.append(pkt)
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
