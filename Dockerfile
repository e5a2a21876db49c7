# The extproc sidecar (also runs the demo upstream: `extproc upstream ...`).
#
#   docker build -t extproc .
#   docker run --rm -v $PWD/extproc.yaml:/etc/extproc/extproc.yaml:ro extproc
#
# The default command is `extproc serve --config /etc/extproc/extproc.yaml` (the shipped demo
# config is baked in; mount your own over it). Runs as uid 10001; the health check asks the admin
# port's /readyz (port from EXTPROC_ADMIN_PORT, default 9902; 503 while draining).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml ./
COPY extproc ./extproc
# every dependency as a wheel, so the runtime stage installs offline and carries no build tools
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EXTPROC_STATE_DIR=/var/lib/extproc
RUN groupadd --system --gid 10001 extproc \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/extproc --no-create-home \
      --shell /usr/sbin/nologin extproc \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/extproc
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels extproc
COPY extproc.yaml /etc/extproc/extproc.yaml
USER 10001:10001
WORKDIR /var/lib/extproc
EXPOSE 50051 9902
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('EXTPROC_ADMIN_PORT', '9902'), timeout=2)"]
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/extproc/extproc.yaml"]
