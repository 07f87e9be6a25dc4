# Stand-in for redis:7.4-alpine on a machine with no image registry: Debian bookworm's
# redis-server (7.0). Like the official image it keeps its data in /data and, started without a
# config file, turns protected mode off so that the other containers may connect.
ARG BASE_IMAGE=modalmesh-standin/bookworm:1
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint.sh
WORKDIR /data
USER redis
ENTRYPOINT ["/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
