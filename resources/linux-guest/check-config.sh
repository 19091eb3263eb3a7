#!/usr/bin/env bash
# Usage: check-config.sh <fragment> <.config>
#
# Verifies that every option the fragment asks for is in the final .config
# with the requested value: `CONFIG_X=v` must appear verbatim, and
# `# CONFIG_X is not set` means CONFIG_X must not be set to anything.
# Prints each option it checks and exits non-zero listing all that failed.
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 <fragment> <.config>" >&2
    exit 2
fi
fragment=$1
config=$2

checked=0
failed=()
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        name=${BASH_REMATCH[1]}
        want=${BASH_REMATCH[2]}
        got=$(grep -E "^${name}=" "$config" | tail -n1 | cut -d= -f2- || true)
        if [ "$got" = "$want" ]; then
            echo "  ok    ${name}=${want}"
        else
            echo "  FAIL  ${name}: requested ${want}, got ${got:-<not set>}"
            failed+=("$name")
        fi
        checked=$((checked + 1))
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        name=${BASH_REMATCH[1]}
        got=$(grep -E "^${name}=" "$config" | tail -n1 | cut -d= -f2- || true)
        if [ -z "$got" ]; then
            echo "  ok    ${name} is not set"
        else
            echo "  FAIL  ${name}: requested not set, got ${got}"
            failed+=("$name")
        fi
        checked=$((checked + 1))
    fi
done < "$fragment"

if [ "$checked" -eq 0 ]; then
    echo "check-config: no options found in $fragment" >&2
    exit 1
fi
if [ "${#failed[@]}" -ne 0 ]; then
    echo "check-config: ${#failed[@]} of $checked requested options did not survive the merge:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    echo "(a dependency is missing from the fragment, or the option does not exist in this kernel version)" >&2
    exit 1
fi
echo "check-config: all $checked requested options present in $config"
