"""A tiny HTTP server for the always-running example.

GET /healthz answers 200 "ok"; GET / answers with the run id and uptime.
The port comes from $PORT (default 8787); it listens on 127.0.0.1 only.
"""

import http.server
import os
import time

STARTED = time.monotonic()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            body = b"ok\n"
        else:
            uptime = time.monotonic() - STARTED
            run_id = os.environ.get("RUNVISOR_RUN_ID", "?")
            body = f"web example, run {run_id}, up {uptime:.0f} s\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        print(f"{self.address_string()} {format % args}", flush=True)


def main() -> None:
    port = int(os.environ.get("PORT", "8787"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
