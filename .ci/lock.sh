#!/usr/bin/env bash
# Refresh .ci/constraints.txt: every package of the test environment, pinned.
#
# Resolves the project's own ranges afresh (newest releases that satisfy them) in a
# throwaway venv, the way `make test` installs (torch from the local CPU wheel, see
# the Makefile), then freezes what was installed. Upgrading is this command, a full
# test run, and a commit of the new file.
#
#   bash .ci/lock.sh            # writes .ci/constraints.txt
#   OUT=/tmp/new.txt bash .ci/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.ci/constraints.txt}
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[test,plot,weights,serve]'
"$venv/bin/python" -m pip install -q --no-index --no-deps "torch==$(sed -n 's/^TORCH_VERSION := //p' Makefile)"
"$venv/bin/python" -m pip install -q -e '.[hf,gpu-compile,tpu]'
{
  echo "# Every package of the test environment, pinned: make test installs with -c this file."
  echo "# Written by .ci/lock.sh on $(date -u +%Y-%m-%d) for $("$venv/bin/python" -V) on $(uname -m)."
  echo "# To upgrade: bash .ci/lock.sh, run the suite, commit this file."
  "$venv/bin/python" -m pip freeze --exclude-editable | LC_ALL=C sort -f
} > "$out"
rm -rf "$(dirname "$venv")"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
