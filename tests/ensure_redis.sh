#!/usr/bin/env bash
# The queue tests start their own redis-server: install Debian's package when it is missing.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (Debian package) for the queue tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    exit 0
fi
echo "tprocess: the queue tests need redis-server: install it (Debian/Ubuntu: sudo apt-get install redis-server)" >&2
exit 1
