# The control worker and the API, for docker-compose.yml. Node workers run natively on each
# machine instead: a container on macOS cannot reach Metal.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SHARDLINE_HOME=/data

COPY pyproject.toml README.md /src/
COPY shardline /src/shardline
COPY workflows /src/workflows
COPY activities /src/activities
COPY workers /src/workers
COPY api /src/api
RUN pip install /src && rm -rf /src

RUN useradd --create-home --uid 1000 shardline && mkdir /data && chown shardline /data
USER shardline
WORKDIR /data

ENTRYPOINT ["shardline"]
CMD ["--help"]
