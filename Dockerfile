# massive-pipeline: one image for every processor (`massive-pipeline run <name>`) and the
# operator commands (offsets, lag, record, replay, simulate).
#   docker build -t massive-pipeline:0.1.0 .
#   docker run --rm -e MASSIVE_REDIS_URL=redis://host:6379/0 massive-pipeline:0.1.0 run monitor
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml requirements.lock ./
COPY schemas ./schemas
COPY streams ./streams
COPY processors ./processors
COPY simulator ./simulator
# Every dependency ships manylinux wheels (hiredis, orjson, msgspec): no compiler needed.
# The pinned, hashed versions of requirements.lock, then the package itself.
RUN pip install --require-hashes -r requirements.lock \
    && pip install --no-deps . \
    && rm -rf /src \
    && groupadd --system --gid 10001 massive \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin massive

WORKDIR /
USER 10001:10001
# 9100: /metrics, /healthz, /readyz (MASSIVE_METRICS_PORT); 8080: sse-gateway.
EXPOSE 9100 8080
ENTRYPOINT ["massive-pipeline"]
CMD ["--help"]
