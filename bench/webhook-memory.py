#!/usr/bin/env python3
"""Memory of `weft run` under 200 concurrent 1 MB webhook bodies (loopback only).

    bench/webhook-memory.py WEFT_BINARY [MAX_INFLIGHT_BYTES]

Starts weft on free ports with a webhook -> JSON Lines flow, sends N (200)
signed 1 MB bodies at once from N threads, and prints the answers by status,
the peak RSS (VmHWM) and the RSS 3 s after the last answer. Bounded: N
requests, 60 s timeout each; stops weft at the end.
"""
import hashlib, hmac, json, os, socket, subprocess, sys, tempfile, threading, time, urllib.request

weft = sys.argv[1]
budget = sys.argv[2] if len(sys.argv) > 2 else None
N = int(os.environ.get("N", "200"))
SECRET = b"memory-secret"

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

work = tempfile.mkdtemp(prefix="weft-mem-")
port, admin = free_port(), free_port()
server = f"server:\n  listen: 127.0.0.1:{port}\n  admin_listen: 127.0.0.1:{admin}\n"
if budget:
    server += f"  max_inflight_bytes: {budget}\n"
cfg = server + """store: {path: store/weft.db}
systems:
  crm:
    source:
      webhook: {path: /hooks/crm, secret: memory-secret, id_header: x-event-id, max_body_bytes: 2097152}
  out:
    sink: {jsonl: {path: out.jsonl}}
flows:
  f: {from: crm, to: [out]}
"""
open(os.path.join(work, "weft.yaml"), "w").write(cfg)
proc = subprocess.Popen([weft, "run", "weft.yaml"], cwd=work, stderr=subprocess.DEVNULL)

def rss(field):
    for line in open(f"/proc/{proc.pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024
    return -1

for _ in range(200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1); break
    except Exception:
        time.sleep(0.05)
base = rss("VmRSS")
statuses, lock = {}, threading.Lock()
def body_of(i):
    # about 1 MB: 9,000 small objects
    items = [{"n": j, "name": f"contact-{i}-{j}", "email": f"c{j}@example.com", "note": "x" * 40} for j in range(9000)]
    return json.dumps({"id": i, "items": items}).encode()
bodies = [body_of(i) for i in range(N)]  # made before, so that all are sent at once
start = threading.Barrier(N)
def send(i):
    body = bodies[i]
    sig = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/hooks/crm", data=body, method="POST",
        headers={"content-type": "application/json", "x-signature-256": sig, "x-event-id": f"m-{i}"})
    start.wait()
    try:
        code = urllib.request.urlopen(req, timeout=60).status
    except urllib.error.HTTPError as e:
        code = e.code
    except Exception as e:
        code = type(e).__name__
    with lock:
        statuses[code] = statuses.get(code, 0) + 1
threads = [threading.Thread(target=send, args=(i,)) for i in range(N)]
t0 = time.time()
for t in threads: t.start()
for t in threads: t.join()
took = time.time() - t0
time.sleep(3)
print(f"budget={budget or 'default (16 MiB)'} requests={N} answers={statuses} secs={took:.1f} "
      f"rss_before_mb={base} peak_rss_mb={rss('VmHWM')} rss_after_mb={rss('VmRSS')} "
      f"anon_after_mb={rss('RssAnon')} file_after_mb={rss('RssFile')}")
proc.terminate(); proc.wait(timeout=60)
