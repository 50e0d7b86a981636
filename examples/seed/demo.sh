#!/usr/bin/env bash
# The seed's scenario: start detached, show `ps -ef` and `status`, stop, show nothing is left.
set -euo pipefail
TPROCESS=${1:-tprocess}
cd "$(dirname "$0")"
LOG=$(mktemp -d)/tprocess.log
show() { ps -eo user,pid,ppid,stat,args | awk -v n="$1" 'NR==1 || $5 ~ "^"n"-"'; }

echo "\$ tprocess start jobs.py:work -n 5 -d"
"$TPROCESS" start jobs.py:work -n 5 -d --log-file "$LOG"
echo; echo "\$ ps -ef | grep tprocess"; show tprocess
echo; echo "\$ tprocess status"; "$TPROCESS" status
echo; echo "\$ tprocess stop"; "$TPROCESS" stop
echo; echo "\$ ps -ef | grep tprocess   # nothing left"; show tprocess

echo; echo "--- the seed's two groups, from examples/seed/tprocess.toml ---"
echo "\$ tprocess start -c tprocess.toml -d"
"$TPROCESS" start -c tprocess.toml -d --log-file "$LOG"
show tprocess
"$TPROCESS" stop -c tprocess.toml
echo; echo "log: $LOG"; tail -n 5 "$LOG"
