# syntax=docker/dockerfile:1
#
# The nzgw gateway image:   docker build -t nzgw .        (docs/DEPLOYMENT.md)
#
# Two stages. The builder turns pdm.lock into a hash-pinned requirements file and installs
# exactly that, wheels only and without dependency resolution, into /opt/venv (pip byte-compiles
# them): no C compiler runs and nothing unlocked gets in. The final stage is the same Python base with that
# venv, the nzgw package and schema/ (read at run time), and a non-root user; no pdm, no pip
# in the venv, no caches, no compilers.
#
# Checked by tests/test_deploy_static.py (hadolint and the properties above).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PDM_CHECK_UPDATE=false \
    PDM_USE_VENV=false
WORKDIR /build
# The pdm that bin/_bootstrap.sh uses; here it only exports the lock.
RUN python -m venv /opt/pdm \
    && /opt/pdm/bin/pip install --no-cache-dir "pdm==2.29.4" "hishel[httpx2]>=1.4,<2"
COPY pyproject.toml pdm.lock ./
RUN /opt/pdm/bin/pdm export --prod --output requirements.txt \
    && python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-cache-dir \
        --require-hashes --no-deps --only-binary=:all: --requirement requirements.txt \
    && pip --python /opt/venv/bin/python check
# `nzgw` on PATH: the package itself lives in /app (schema/ must sit beside it), so the venv
# gets a path entry for /app and a console script, rather than an installed copy.
RUN echo /app > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/nzgw-app.pth" \
    && printf '%s\n' '#!/opt/venv/bin/python' 'import sys' 'from nzgw.cli import main' 'sys.exit(main())' \
        > /opt/venv/bin/nzgw \
    && chmod 0755 /opt/venv/bin/nzgw

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="nzgw" \
      org.opencontainers.image.description="Secure multi-tenant API gateway in front of Ollama" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NZGW_BIND=0.0.0.0:8080 \
    NZGW_MIGRATE_ON_START=true \
    NZGW_LOG_FORMAT=json \
    DATABASE_URL=sqlite:////app/var/nzgw.db
RUN groupadd --system --gid 10001 nzgw \
    && useradd --system --uid 10001 --gid nzgw --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin nzgw
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Code and migrations belong to root: the gateway's user can read them, not change them.
COPY nzgw/ /app/nzgw/
COPY schema/ /app/schema/
RUN python -m compileall -q /app/nzgw \
    && mkdir -p /app/var/spool \
    && chown -R nzgw:nzgw /app/var
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# Liveness on /healthz at the port of NZGW_BIND, with nothing but the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import http.client, os, sys; port = int(os.environ.get('NZGW_BIND', '0.0.0.0:8080').rpartition(':')[2]); c = http.client.HTTPConnection('127.0.0.1', port, timeout=4); c.request('GET', '/healthz'); sys.exit(c.getresponse().status != 200)"]
# Exec form: nzgw is PID 1's child of nothing, so SIGTERM reaches it (and it drains).
CMD ["nzgw", "serve"]
