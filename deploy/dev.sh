#!/usr/bin/env bash
# One entry point for a fresh machine: installs system packages and the Python environment, then runs
#   deploy/dev.sh demo [meshctl demo args...]   the local demo mesh (real meshnode processes on loopback)
#   deploy/dev.sh test [pytest args...]         the whole test suite (lint, types, unit, property,
#                                               simulation, real-process and, as root, netns/nftables tests)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"

need_pkgs=()
for pair in nft:nftables iptables:iptables ipset:ipset ip:iproute2 ps:procps systemd-analyze:systemd \
        faketime:faketime prlimit:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing system packages: ${need_pkgs[*]}" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
    else
        echo "note: missing ${need_pkgs[*]} (run as root to install); root-only tests will be skipped" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml deploy/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -c deploy/constraints.txt -e ".[test,sim,cluster]"
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"

cmd="${1:-help}"; shift || true
case "$cmd" in
    demo)
        exec meshctl demo "$@" ;;
    test)
        ruff check protocol meshnode simulations tests
        mypy
        exec python -m pytest "$@" ;;
    shell)
        exec bash ;;
    *)
        echo "usage: deploy/dev.sh demo [args] | test [pytest args] | shell" >&2; exit 2 ;;
esac
