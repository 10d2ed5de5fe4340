"""The machine's own loopback TCP ceiling, without kvfs: what any TCP read path can reach here.

N sender threads each ``os.sendfile`` a warm file's bytes to their own connection, over and over; N
receiver threads ``recv_into`` a reused buffer (GIL released in both syscalls). Reported: aggregate GB/s
for each N in ``--streams``, and CPU seconds per GB (both ends together). kvfs's TCP path (chunkserver ``sendfile`` + client ``recv_into``, then
checksums and a copy) cannot beat this figure, so its ratio to this is the TCP path's efficiency.

    python3 bench/tcp_ceiling.py --streams 1,4,16 --seconds 3
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time

CHUNK = 4 << 20


def run(streams: int, seconds: float, path: str) -> tuple[float, float]:
    """(GB/s, CPU seconds per GB of both ends: they run in this one process)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(streams)
    port = listener.getsockname()[1]
    stop = threading.Event()
    received = [0] * streams

    def send(conn: socket.socket) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            while not stop.is_set():
                offset = 0
                while offset < CHUNK:
                    offset += os.sendfile(conn.fileno(), fd, offset, CHUNK - offset)
        except OSError:
            pass
        finally:
            os.close(fd)
            conn.close()

    def receive(i: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        view = memoryview(bytearray(CHUNK))
        try:
            while not stop.is_set():
                n = sock.recv_into(view)
                if n == 0:
                    break
                received[i] += n
        finally:
            sock.close()

    receivers = [threading.Thread(target=receive, args=(i,)) for i in range(streams)]
    for t in receivers:
        t.start()
    senders = []
    for _ in range(streams):
        conn, _ = listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        senders.append(threading.Thread(target=send, args=(conn,)))
    for t in senders:
        t.start()
    time.sleep(0.5)  # ramp up
    start, before, cpu0 = time.perf_counter(), sum(received), time.process_time()
    time.sleep(seconds)
    moved = sum(received) - before
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    stop.set()
    for t in receivers + senders:
        t.join()
    listener.close()
    return moved / elapsed / 1e9, cpu / (moved / 1e9)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="1,4,16")
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(CHUNK))
        f.flush()
        for n in (int(x) for x in args.streams.split(",")):
            rate, cpu = run(n, args.seconds, f.name)
            print(f"loopback TCP, sendfile -> recv_into, {n:3d} streams: {rate:6.2f} GB/s, {cpu:.3f} CPU s/GB",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
