"""A hostile data-plane peer, standard library only (it runs as another user, under
the system Python, fed to ``python3 -c``). Its first line of stdin is
``{"mode": MODE, ...arguments}`` (JSON). It prints one JSON line "ready" once
its connections are set up, waits for a line on stdin (or its end), then
prints one JSON line of results and exits.

Modes:
  headers  n connections each send a fixed header declaring ``header_len`` bytes
           of header message plus one byte, then stall
  stall    n connections each declare an UPDATE with ``payload_len`` bytes of
           payload and send one byte of it, then one more every ``trickle_s``
           (so the frame never stalls outright)
  batch    n connections each send one BATCH_READ whose header message is
           ``header_hex``, and report the reply's status code; with
           ``trickle_s`` they read only 64 KiB of reply every ``trickle_s``
  idle     n connections from ``source`` that never send a byte (``wait_closed_s``:
           at the end, wait that long for the server to close them all)
  unix     connect to the unix socket ``path``; report the errno (0 = connected)
  read     open ``path`` for reading; report the errno (0 = opened)
Results: how many of the connections the server had closed by the end.
"""

import errno
import json
import os
import resource
import select
import socket
import struct
import sys
import time

_POLY = 0x82F63B78  # CRC32C, reflected
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def fixed_header(msg_type, request_id, header_len, payload_len):
    body = struct.pack(
        "<IBBHQIIQI", 0x50444643, 1, 0, msg_type, request_id, header_len, 0, payload_len, 0
    )
    return body + struct.pack("<I", crc32c(body))


def connect(address, source=None):
    host, port = address.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source:
        s.bind((source, 0))
    s.settimeout(10)
    s.connect((host, int(port)))
    return s


def closed_by_server(s):
    """True when the server closed (EOF or reset) the connection; whatever it had
    sent first is read and dropped."""
    try:
        while s.recv(1 << 20, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        return e.errno != errno.ENOTCONN  # ENOTCONN: the connect never completed


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def main():
    args = json.loads(sys.stdin.readline())
    mode = args["mode"]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, result = [], {}
    if mode == "headers":
        for i in range(args["n"]):
            s = connect(args["address"])
            s.sendall(fixed_header(1, i + 1, args["header_len"], 0) + b"x")
            socks.append(s)
    elif mode == "stall":
        for i in range(args["n"]):
            s = connect(args["address"])
            s.sendall(fixed_header(1, i + 1, 0, args["payload_len"]) + b"x")
            socks.append(s)
    elif mode == "batch":
        header = bytes.fromhex(args["header_hex"])
        for i in range(args["n"]):
            s = connect(args["address"])
            s.sendall(fixed_header(2, i + 1, len(header), 0) + header)
            socks.append(s)
        codes = []
        for s in socks if not args.get("trickle_s") else ():
            s.settimeout(30)
            fixed = recv_exact(s, 40)
            flags, status = fixed[5], struct.unpack_from("<I", fixed, 20)[0]
            payload_len = struct.unpack_from("<Q", fixed, 24)[0]
            codes.append({"error": bool(flags & 2), "status": status, "payload": payload_len})
        result["replies"] = codes
    elif mode == "idle":
        for _ in range(args["n"]):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((args["source"], 0))
            s.setblocking(False)
            host, port = args["address"].rsplit(":", 1)
            s.connect_ex((host, int(port)))
            socks.append(s)
    elif mode == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(args["path"])
            result["errno"] = 0
        except OSError as e:
            result["errno"] = e.errno
        s.close()
    elif mode == "read":
        try:
            os.close(os.open(args["path"], os.O_RDONLY))
            result["errno"] = 0
        except OSError as e:
            result["errno"] = e.errno
    print(json.dumps({"ready": len(socks)}), flush=True)
    trickle_s = args.get("trickle_s")
    while trickle_s and not select.select([sys.stdin], [], [], trickle_s)[0]:
        for s in socks:
            try:
                if mode == "batch":
                    s.recv(64 * 1024, socket.MSG_DONTWAIT)  # progress, but slowly
                else:
                    s.send(b"x")
            except OSError:
                pass  # the server closed it, or nothing arrived yet
    sys.stdin.readline()
    # wait_closed_s: up to this long for the server to close every connection.
    deadline = time.monotonic() + float(args.get("wait_closed_s", 0))
    while time.monotonic() < deadline and not all(closed_by_server(s) for s in socks):
        time.sleep(0.2)
    result["closed"] = sum(1 for s in socks if closed_by_server(s))
    result["connections"] = len(socks)
    print(json.dumps(result), flush=True)


main()
