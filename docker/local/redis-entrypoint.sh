#!/bin/sh
# `redis-server ARGS...` runs with protected mode off, as in the official redis image.
set -e
if [ "${1:-}" = redis-server ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
