"""circuit-tracer's own graph server (its ``CircuitGraphHandler``: the frontend from its package,
``/data/`` and ``/graph_data/`` from ``DATA_DIR``) on 127.0.0.1 and a free port, for the viewer
test. Runs in the circuit-tracer virtual environment (``.ci/circuit-tracer-venv``); prints the
port, then serves until it is killed. (circuit-tracer's ``serve()`` listens on every interface.)

    python serve.py DATA_DIR
"""

import functools
import socketserver
import sys

from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR, CircuitGraphHandler

handler = functools.partial(CircuitGraphHandler, frontend_dir=DEFAULT_FRONTEND_DIR, data_dir=sys.argv[1])
with socketserver.TCPServer(("127.0.0.1", 0), handler) as httpd:
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()
