# Helper of mesh-bench: a TCP echo server and the two small-message clients.
#   server PORT           echo what is read, per connection, one thread each (dual stack)
#   rr HOST PORT N SIZE   N request/response exchanges of SIZE bytes each way on one
#                         connection; prints {"p50_us":..,"p99_us":..,"n":..}
#   cr HOST PORT N        N sequential connections, each 1 byte each way; prints
#                         {"conns_per_s":..,"n":..}
#   many-server PORT      echo server for many mostly idle connections: one thread, selectors
#                         (dual stack); accept errors are reported on stderr
#   hold HOST PORT N      opens N connections, echoes 1 byte on each, prints
#                         {"held":N,"open_s":..,"nofile":..} and keeps them open until stdin
#                         closes; on a failure prints {"error":..,"errno":..,"held":K}, holds
#                         the K connections until stdin closes, exits 1
import json, resource, selectors, socket, sys, threading, time

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

def raise_nofile():
    # Thousands of sockets need more than the usual soft limit of 1024 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

def serve_many(port):
    raise_nofile()
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    unsent = {}  # connection -> bytes the peer has not taken yet
    accept_errors = 0

    def close(c):
        sel.unregister(c)
        unsent.pop(c, None)
        c.close()

    def flush(c):
        data = unsent.get(c, b"")
        try:
            n = c.send(data) if data else 0
        except BlockingIOError:
            n = 0
        rest = data[n:]
        if rest:
            unsent[c] = rest
            sel.modify(c, selectors.EVENT_READ | selectors.EVENT_WRITE, "conn")
        elif c in unsent:
            del unsent[c]
            sel.modify(c, selectors.EVENT_READ, "conn")

    while True:
        for key, mask in sel.select():
            if key.data is None:
                while True:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        # E.g. EMFILE: say so (first few times), the client will see it fail.
                        accept_errors += 1
                        if accept_errors <= 5:
                            print("many-server: accept failed: %s" % e, file=sys.stderr, flush=True)
                        time.sleep(0.01)
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ, "conn")
                continue
            c = key.fileobj
            try:
                if mask & selectors.EVENT_READ:
                    b = c.recv(65536)
                    if not b:
                        close(c)
                        continue
                    unsent[c] = unsent.get(c, b"") + b
                flush(c)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                close(c)

def hold(host, port, n):
    nofile = raise_nofile()
    socks = []
    held = 0
    t = time.perf_counter()
    try:
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=10)
            socks.append(s)
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise ConnectionError("closed before the 1-byte echo")
            held += 1
    except OSError as e:
        print(json.dumps({"error": "connection %d: %s" % (held + 1, e),
                          "errno": e.errno, "held": held, "nofile": nofile}), flush=True)
        sys.stdin.read()  # keep the connections while the caller looks at the agents
        sys.exit(1)
    print(json.dumps({"held": held, "open_s": time.perf_counter() - t, "nofile": nofile}),
          flush=True)
    sys.stdin.read()  # until the caller closes our stdin (or kills us)
    for s in socks:
        s.close()

if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        serve(int(sys.argv[2]))
    elif mode == "rr":
        rr(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "cr":
        cr(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "many-server":
        serve_many(int(sys.argv[2]))
    elif mode == "hold":
        hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit("unknown mode " + mode)
