#!/usr/bin/env python3
"""A toy CRM and ERP for the two-way sync example (Python standard library only).

Each keeps customers in memory, accepts weft's writes (POST /customers creates,
PUT /customers/<id> updates the fields sent) and, like real systems, reports
every change -- its users' and weft's own writes -- to weft by webhook, in
order, retrying until weft accepts. A small control API lets the demo script
play the users: POST /edit {"id", "field", "value"}, POST /create {...},
GET /customers.

    python3 systems.py CRM_PORT ERP_PORT WEFT_URL
"""
import json
import queue
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class System:
    def __init__(self, name, prefix, hook):
        self.name, self.prefix, self.hook = name, prefix, hook
        self.records, self.next, self.changes = {}, 0, 0
        self.lock = threading.Lock()
        self.outbox = queue.Queue()
        threading.Thread(target=self.sender, daemon=True).start()

    def report(self, rid):
        # called with the lock held
        self.changes += 1
        body = dict(self.records[rid], id=rid, updated_at=int(time.time() * 1000))
        self.outbox.put((f"{self.name}-change-{self.changes}", body))

    def sender(self):
        while True:
            event, body = self.outbox.get()
            data = json.dumps(body).encode()
            while True:
                try:
                    req = urllib.request.Request(self.hook, data=data, method="POST",
                                                 headers={"content-type": "application/json",
                                                          "x-event-id": event})
                    urllib.request.urlopen(req, timeout=5).read()
                    break
                except Exception:
                    time.sleep(0.2)

    def create(self, fields):
        with self.lock:
            self.next += 1
            rid = f"{self.prefix}-{self.next}"
            self.records[rid] = dict(fields)
            self.report(rid)
            return rid

    def update(self, rid, fields):
        with self.lock:
            if rid not in self.records:
                return False
            self.records[rid].update(fields)
            self.report(rid)
            return True


def serve(system, port):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self):
            n = int(self.headers.get("content-length", 0))
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self):
            with system.lock:
                self.answer(200, system.records)

        def do_POST(self):
            b = self.body()
            if self.path == "/customers" or self.path == "/create":
                self.answer(200, {"id": system.create(b)})
            elif self.path == "/edit":
                ok = system.update(b["id"], {b["field"]: b["value"]})
                self.answer(200 if ok else 404, {"ok": ok})
            else:
                self.answer(404, {"error": "not found"})

        def do_PUT(self):
            rid = self.path.rsplit("/", 1)[-1]
            ok = system.update(rid, self.body())
            self.answer(200 if ok else 404, {"id": rid} if ok else {"error": "no such customer"})

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    crm_port, erp_port, weft = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    crm = System("crm", "C", f"{weft}/hooks/crm")
    erp = System("erp", "E", f"{weft}/hooks/erp")
    threading.Thread(target=serve, args=(crm, crm_port), daemon=True).start()
    serve(erp, erp_port)
