#!/usr/bin/env bash
# The Docker engine for composemesh on a host where nothing else runs it (no systemd, CI):
#
#   scripts/dockerd.sh start    start dockerd in the background unless `docker info` answers;
#                               wait until it does. A pidfile records that WE started it.
#   scripts/dockerd.sh stop     stop the dockerd that `start` started (and only that one),
#                               wait until it is gone, remove the pidfile.
#   scripts/dockerd.sh status   say whether an engine answers and whether we started it;
#                               exit 0 when it answers, 3 when it does not.
#
# Env: COMPOSEMESH_DOCKERD_ARGS (extra dockerd arguments), COMPOSEMESH_DOCKERD_PIDFILE,
# COMPOSEMESH_DOCKERD_LOG, COMPOSEMESH_DOCKERD_WAIT (seconds to wait, default 60).
set -euo pipefail

PIDFILE=${COMPOSEMESH_DOCKERD_PIDFILE:-/run/composemesh-dockerd.pid}
LOG=${COMPOSEMESH_DOCKERD_LOG:-/var/log/composemesh-dockerd.log}
WAIT=${COMPOSEMESH_DOCKERD_WAIT:-60}

say() { printf 'dockerd: %s\n' "$*"; }
die() { printf 'dockerd: error: %s\n' "$*" >&2; exit 1; }

answers() { docker info >/dev/null 2>&1; }

# The pid in our pidfile, if that process is still a dockerd; empty otherwise.
our_pid() {
    [ -f "$PIDFILE" ] || return 0
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [ "$pid" = systemd ]; then echo systemd; return 0; fi
    case "$pid" in '' | *[!0-9]*) return 0 ;; esac
    if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = dockerd ]; then echo "$pid"; fi
}

have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root (run it with sudo)"
}

find_dockerd() {
    local d
    for d in "$(command -v dockerd 2>/dev/null || true)" /usr/sbin/dockerd /usr/bin/dockerd; do
        if [ -n "$d" ] && [ -x "$d" ]; then echo "$d"; return 0; fi
    done
    return 1
}

wait_until_answers() {
    local pid=$1 waited=0
    until answers; do
        if [ "$pid" != systemd ] && ! kill -0 "$pid" 2>/dev/null; then
            say "dockerd exited; the end of $LOG:"
            tail -n 20 "$LOG" >&2 || true
            rm -f "$PIDFILE"
            die "dockerd did not start"
        fi
        if [ "$waited" -ge "$WAIT" ]; then
            tail -n 20 "$LOG" >&2 || true
            die "dockerd did not answer within ${WAIT}s (log: $LOG)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

start() {
    local pid
    pid=$(our_pid)
    if answers; then
        if [ -n "$pid" ]; then say "running (started by this script, pid $pid)"
        else say "running (not started by this script; left alone)"; fi
        return 0
    fi
    need_root "starting dockerd"
    if [ -n "$pid" ] && [ "$pid" != systemd ]; then
        # Ours, but not answering yet (still starting up): wait for it.
        say "waiting for dockerd (pid $pid)"
        wait_until_answers "$pid"
        say "running (pid $pid)"
        return 0
    fi
    if have_systemd && systemctl cat docker.service >/dev/null 2>&1; then
        say "starting docker.service (systemd)"
        mkdir -p "$(dirname "$PIDFILE")"
        systemctl start docker.service
        echo systemd >"$PIDFILE"
        wait_until_answers systemd
        say "running (docker.service)"
        return 0
    fi
    local dockerd
    dockerd=$(find_dockerd) || die "dockerd is not installed (run scripts/bootstrap.sh, or apt-get install docker.io)"
    mkdir -p "$(dirname "$PIDFILE")" "$(dirname "$LOG")"
    say "starting $dockerd (log: $LOG)"
    # setsid: its own session, so that neither this shell's end nor a Ctrl-C reaches it.
    # shellcheck disable=SC2086  # COMPOSEMESH_DOCKERD_ARGS is a list of words on purpose
    setsid "$dockerd" ${COMPOSEMESH_DOCKERD_ARGS:-} </dev/null >>"$LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"
    wait_until_answers "$pid"
    say "running (pid $pid)"
}

stop() {
    local pid
    pid=$(our_pid)
    if [ -z "$pid" ]; then
        if [ -f "$PIDFILE" ]; then
            rm -f "$PIDFILE"
            say "the dockerd this script started is gone already"
        else
            say "not started by this script; nothing to stop"
        fi
        return 0
    fi
    need_root "stopping dockerd"
    if [ "$pid" = systemd ]; then
        say "stopping docker.service (systemd)"
        systemctl stop docker.service docker.socket 2>/dev/null || systemctl stop docker.service
        rm -f "$PIDFILE"
        say "stopped"
        return 0
    fi
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    # dockerd gives running containers up to 15 s to stop, then shuts down containerd.
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge 60 ]; then
            say "dockerd (pid $pid) still running after 60s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 1
        waited=$((waited + 1))
    done
    rm -f "$PIDFILE"
    say "stopped"
}

status() {
    local pid
    pid=$(our_pid)
    if answers; then
        if [ -n "$pid" ]; then say "running (started by this script, pid $pid)"
        else say "running (not started by this script)"; fi
        return 0
    fi
    if [ -n "$pid" ]; then say "not answering (started by this script, pid $pid; log: $LOG)"
    else say "not running"; fi
    return 3
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
