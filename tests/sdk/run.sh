#!/usr/bin/env bash
# Runs the Python SDK tests (tests/sdk) in the repo's .venv, creating it and installing
# tests/sdk/requirements.txt when needed. Expects the binaries to be built already
# (`cargo build --all-targets`); extra arguments go to pytest, e.g. `-k azure -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

VENV=.venv
REQS=tests/sdk/requirements.txt

if [ ! -x "$VENV/bin/python" ]; then
    echo "sdk tests: creating $VENV" >&2
    python3 -m venv "$VENV"
fi

# Install only when a pinned requirement is missing or at another version.
if ! "$VENV/bin/python" - "$REQS" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, want = line.partition("==")
    try:
        if want and version(name.strip()) != want.strip():
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
    echo "sdk tests: installing $REQS into $VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS"
fi

exec "$VENV/bin/python" -m pytest -q tests/sdk "$@"
