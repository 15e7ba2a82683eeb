"""The test server helper never orphans a server: stopped at the end of its block, and when the process
running the tests is terminated (a CI timeout, a developer's kill) in the middle of one."""

import os
import signal
import subprocess
import sys
import textwrap
import time

FAKE_SERVER = textwrap.dedent("""
    import http.server, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a):
            pass
    port = int(sys.argv[sys.argv.index("--port") + 1])
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")

RUNNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from memit_vllm.testing.server import vllm_server
    with vllm_server([sys.executable, sys.argv[1]], "m", Path(sys.argv[2])) as server:
        print(server.proc.pid, flush=True)
        time.sleep(600)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()[:1] \
        not in ("Z", "")


def test_a_terminated_test_process_stops_its_server(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE_SERVER)
    (tmp_path / "runner.py").write_text(RUNNER)
    runner = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "fake.py"),
                               str(tmp_path / "log")], stdout=subprocess.PIPE, text=True)
    server_pid = int(runner.stdout.readline())
    assert alive(server_pid)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) != 0
    deadline = time.monotonic() + 30
    while alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(server_pid), "the server outlived the terminated test process"
