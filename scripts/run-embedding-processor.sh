#!/usr/bin/env bash
# Drain the embedding queue like the hand-built processor did:
#   scripts/run-embedding-processor.sh [batch_size=5] [delay_ms=1000] [extra `run` args]
# e.g. `scripts/run-embedding-processor.sh 10 2000`. Prints a summary; exits non-zero if any
# item failed. Configuration comes from the environment (DATABASE_URL, OPENAI_BASE_URL,
# OPENAI_API_KEY, EMBEDDING_MODEL, ...), e.g. `set -a; source .env; set +a` first.
set -euo pipefail

batch_size=${1:-5}
delay_ms=${2:-1000}
shift $(( $# > 2 ? 2 : $# ))

here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -x "$here/.venv/bin/queue-processor" ]; then
  qp="$here/.venv/bin/queue-processor"
elif command -v queue-processor >/dev/null; then
  qp="$(command -v queue-processor)"
else
  echo "queue-processor is not installed: run scripts/test.sh or pip install ." >&2
  exit 2
fi

# One batch at a time, then the pause, as the hand-built processor paced its work (the
# worker's own default keeps two batches in flight); QUEUE_PROCESSOR_CONCURRENCY or a
# --concurrency argument overrides it.
concurrency=${QUEUE_PROCESSOR_CONCURRENCY:-1}

echo "Starting embedding queue processor (batch size ${batch_size}, delay ${delay_ms} ms)" >&2
exec "$qp" run --drain --batch-size "$batch_size" --delay-ms "$delay_ms" \
  --concurrency "$concurrency" "$@"
