#!/bin/sh
# As the official image's entrypoint: `redis-server` with flags and no config file listens on
# every interface with protected mode off (the compose network is the boundary).
set -e
if [ "$1" = "redis-server" ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
