#!/usr/bin/env bash
# Runs `go test` with the arguments given, keeping its whole output in
# $GO_TEST_LOG (default: go-test.log, ignored by git), and on failure
# repeats the lines that say what failed at the end: a CI log shows its
# tail, and a test timeout's goroutine dump would otherwise push the name
# of the test that hung out of it.
set -uo pipefail
log=${GO_TEST_LOG:-go-test.log}
go=${GO:-go}
"$go" test "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo
  echo "== what failed (the whole output is in $log) =="
  # A timeout names the tests that were running; a failure its test and
  # package; a panic or a build error its first line.
  grep -E -A12 '^panic: test timed out' "$log" | grep -E '^(panic|	running tests:|		)' || true
  grep -E '^(--- FAIL|FAIL|panic:|# |.*\.go:[0-9]+:[0-9]+: )' "$log" | grep -v '^panic: test timed out' | head -60 || true
fi
exit "$rc"
