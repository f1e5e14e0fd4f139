# Vectory image: one image for the API (default command), the worker
# (`python -m workers.main`) and migrations (`alembic upgrade head`).
# docker-compose.yml wires them together; tests/test_compose.py checks the wiring.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the runtime dependencies in a virtualenv ----------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
WORKDIR /build

# Only [project].dependencies (no dev extras), read from pyproject.toml and held
# to the versions of requirements.lock, so this layer is rebuilt when the
# dependencies change, not on every code change. The
# application itself is not pip-installed: its sources live in /app, where
# core/db.py finds alembic.ini next to them.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && /opt/venv/bin/pip install -c requirements.lock -r requirements.txt

# --- runtime -----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 vectory \
    && useradd --system --uid 10001 --gid vectory --home-dir /app --no-create-home --shell /usr/sbin/nologin vectory

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Runtime sources only (sandbox/ and tests/ are development tools).
COPY api ./api
COPY activities ./activities
COPY core ./core
COPY workers ./workers
COPY workflows ./workflows
COPY alembic.ini ./alembic.ini
COPY migrations ./migrations

USER vectory

EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["uvicorn", "--factory", "workers.apiserver:create_app", "--host", "0.0.0.0", "--port", "8000"]
