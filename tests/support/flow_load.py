"""Load for the flow upload tests, run as a real process with a login UID.

usage: flow_load.py ports ADDR FIRST COUNT   one TCP connect to each port
                                            FIRST..FIRST+COUNT-1 (each a flow)
       flow_load.py loop ADDR               connects to rotating ports until
                                            stdin closes
       flow_load.py sessions SOCKET N       N `session_open` requests to ausd
                                            one after another; their latencies
Prints a JSON result on stdout.
"""

import json
import select
import socket
import sys
import time


def connect_once(addr: str, port: int) -> str:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(0.2)
    try:
        s.connect((addr, port))
        return "ok"
    except PermissionError:
        return "denied"
    except OSError:
        return "other"
    finally:
        s.close()


def ports(addr: str, first: int, count: int) -> dict:
    seen: dict[str, int] = {}
    for port in range(first, first + count):
        r = connect_once(addr, port)
        seen[r] = seen.get(r, 0) + 1
    return seen


def loop(addr: str) -> dict:
    n, port = 0, 30000
    while not select.select([sys.stdin], [], [], 0)[0]:
        connect_once(addr, port)
        n, port = n + 1, 30000 + (port - 29999) % 20000
    return {"connects": n}


def sessions(path: str, n: int) -> dict:
    from aus.agent import control
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        control.request(path, "session_open")
        took.append(time.perf_counter() - t0)
    return {"seconds": took}


if __name__ == "__main__":
    action = sys.argv[1]
    if action == "ports":
        out = ports(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif action == "loop":
        out = loop(sys.argv[2])
    else:
        out = sessions(sys.argv[2], int(sys.argv[3]))
    print(json.dumps(out))
