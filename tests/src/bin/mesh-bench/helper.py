# Helper of mesh-bench: a TCP echo server and the two small-message clients.
#   server PORT           echo what is read, per connection, one thread each (dual stack)
#   rr HOST PORT N SIZE   N request/response exchanges of SIZE bytes each way on one
#                         connection; prints {"p50_us":..,"p99_us":..,"n":..}
#   cr HOST PORT N        N sequential connections, each 1 byte each way; prints
#                         {"conns_per_s":..,"n":..}
import json, socket, sys, threading, time

def serve(port):
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(1024)
    def handle(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
        except OSError:
            pass
        finally:
            c.close()
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()

def recv_exact(s, n):
    got = 0
    while got < n:
        b = s.recv(n - got)
        if not b:
            raise SystemExit("connection closed early")
        got += len(b)

def rr(host, port, n, size):
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * size
    for _ in range(min(50, n)):  # warm-up
        s.sendall(msg); recv_exact(s, size)
    lat = []
    for _ in range(n):
        t = time.perf_counter_ns()
        s.sendall(msg)
        recv_exact(s, size)
        lat.append(time.perf_counter_ns() - t)
    s.close()
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000.0
    print(json.dumps({"p50_us": pct(0.50), "p99_us": pct(0.99), "n": n}))

def cr(host, port, n):
    t = time.perf_counter()
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"x")
        recv_exact(s, 1)
        s.close()
    el = time.perf_counter() - t
    print(json.dumps({"conns_per_s": n / el, "n": n}))

if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        serve(int(sys.argv[2]))
    elif mode == "rr":
        rr(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "cr":
        cr(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit("unknown mode " + mode)
