# kefu chat server: one image for every node (docs/operations.md, "Docker").
#
#   docker build -t kefu .
#   docker run -p 8000:8000 -v $PWD/config.toml:/app/config.toml:ro -v kefu-data:/app/data kefu
#
# Serving only: `pip install .` without the [train] extra, so no torch or transformers; intent
# models run on ONNX Runtime + tokenizers, which are plain dependencies.
#
# A trained intent model is a build output, not a source file: `make model` (or
# `kefu train --bot shop`) writes models/shop/, and every models/<bot>/ folder present when the
# image is built is copied in (.dockerignore leaves out what training keeps beside the served
# files).  A bot without one answers with its knowledge file's classifier.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt

# kefu itself (models/ holds the training code, installed but never imported when serving).
COPY README.md ./
COPY engine/ engine/
COPY plugins/ plugins/
COPY server/ server/
COPY models/*.py models/
RUN pip install . \
    && cd / && rm -rf /src

# What the server reads at run time: knowledge files and trained models (the defaults would be
# beside the installed packages, which a non-editable install does not have), and the data
# directory (SQLite file, generated secret key), a volume.  Listening on every interface, port
# 8000.  These are environment variables, so they win over /app/config.toml: change them with
# `docker run -e`, not in the file.
WORKDIR /app
COPY knowledge/ knowledge/
COPY models/ models/
ENV KEFU_KNOWLEDGE_DIR=/app/knowledge \
    KEFU_MODELS_DIR=/app/models \
    KEFU_SERVER_DATA_DIR=/app/data \
    KEFU_SERVER_HOST=0.0.0.0 \
    KEFU_SERVER_PORT=8000

RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home kefu \
    && mkdir -p /app/data \
    && chown kefu:kefu /app/data
VOLUME ["/app/data"]
USER kefu

EXPOSE 8000
# 200 from /healthz: storage answers ("degraded", Redis away, is still 200: the node serves).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KEFU_SERVER_PORT', '8000'), timeout=4)"]

# Sanic stops gracefully on SIGTERM (sockets closed with 1001, bot turns finish for up to
# bot_timeout_s): give `docker stop` more than its default 10 s (`-t 30`, compose's
# stop_grace_period).
CMD ["kefu", "serve", "--config", "/app/config.toml"]
