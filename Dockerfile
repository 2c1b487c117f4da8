# syntax=docker/dockerfile:1
# One image for every stockhold process: the API (`stockhold serve`, the default command) and the
# write-behind worker (`stockhold worker`); any other subcommand runs the same way
# (`docker run IMAGE keys create ...`). See the README, "Running in containers".
#
# Python 3.11 on Debian bookworm: the interpreter and distribution the test suite runs on.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the virtualenv, with every dependency from PyPI wheels ------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# The dependencies first, read from pyproject.toml alone, so that a change to the code reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# The project itself, installed editable (as `make` does): app/store/ finds lua/ and migrations/ beside
# app/ in the source tree, which a regular install into site-packages would leave behind.
COPY README.md ./
COPY app ./app
COPY lua ./lua
COPY migrations ./migrations
RUN pip install --no-deps -e . \
 && python -m compileall -q /app/app

# ---- runtime: the virtualenv and the source tree, nothing to build with -----------------------------
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric uid, so that orchestrators can check runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 stockhold \
 && useradd --system --uid 10001 --gid stockhold --no-log-init --home-dir /var/lib/stockhold --create-home \
        --shell /usr/sbin/nologin stockhold

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STOCKHOLD_HOST=0.0.0.0 \
    STOCKHOLD_PORT=8000 \
    STOCKHOLD_DATA_DIR=/var/lib/stockhold

# The working directory is where Settings reads an optional .env file; .dockerignore keeps the
# developer's out of the image.
WORKDIR /var/lib/stockhold
USER 10001:10001
EXPOSE 8000

# The API's readiness: Redis and PostgreSQL answer, every shard is rebuilt, the sweeper runs (503
# otherwise, which urlopen raises on). Python's own urllib: the image needs no curl for it. A worker
# container has no HTTP port: the compose file turns this check off for it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('STOCKHOLD_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["stockhold"]
CMD ["serve"]
