"""``python -m queue_processor.testing``: the fake server in its own process.

Prints ``LISTENING <port>`` on stdout once ready, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from queue_processor.testing.protocol import FAULT_KINDS
from queue_processor.testing.server import FakeOpenAIServer


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m queue_processor.testing",
        description="Fake OpenAI embeddings server for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--dims", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--faults", default="429,500", help=f"comma list of {FAULT_KINDS}")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--api-key", default=None, help="require this Bearer key")
    parser.add_argument("--models", default=None, help="comma list of known model names")
    parser.add_argument("--timeout-sleep-s", type=float, default=30.0)
    parser.add_argument("--slow-ms", type=float, default=1000.0)
    parser.add_argument(
        "--max-input-tokens", type=int, default=None, help="refuse longer inputs (400)"
    )
    parser.add_argument(
        "--max-request-tokens", type=int, default=None, help="refuse larger requests (400)"
    )
    parser.add_argument(
        "--bytes-per-token", type=float, default=None, help="count tokens so (default cl100k)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; prints ``LISTENING <port>`` once ready."""
    args = _parse_args(argv)
    server = FakeOpenAIServer(
        dims=args.dims,
        host=args.host,
        port=args.port,
        latency_s=args.latency_ms / 1000,
        required_api_key=args.api_key,
        known_models=None if args.models is None else args.models.split(","),
        fault_rate=args.fault_rate,
        faults=[fault for fault in args.faults.split(",") if fault],
        seed=args.seed,
        timeout_sleep_s=args.timeout_sleep_s,
        slow_s=args.slow_ms / 1000,
        max_input_tokens=args.max_input_tokens,
        max_request_tokens=args.max_request_tokens,
        bytes_per_token=args.bytes_per_token,
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with server:
        print(f"LISTENING {server.port}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
