#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run them.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -r requirements-dev.txt
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
# The engine and server tests run in parallel, one process per CPU, each test module kept in one
# process (DANLU_TEST_PROCESSES=0: all in this one); then the browser tests, one at a time, since
# each drives a whole app with its training worker. "No tests selected" (5) is not a failure.
status=0
python3 -m pytest -n "${DANLU_TEST_PROCESSES:-auto}" --dist loadscope -m "not browser" "$@" || status=$?
[ "$status" -eq 5 ] && status=0
browser=0
python3 -m pytest -m browser "$@" || browser=$?
[ "$browser" -eq 5 ] && browser=0
[ "$status" -ne 0 ] && exit "$status"
exit "$browser"
