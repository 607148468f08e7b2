# tgi-space on the official TGI image: the real launcher and router, plus
#  - a `text-generation-launcher` shim that accepts --speculate-mode {space,none} (or SPECULATE_MODE),
#  - a `text-generation-server` dispatch: SPACE checkpoints are served by tgi-space's shard,
#    every other model (and `download-weights`) by TGI's own server, so one image serves both.
# Hugging Face Inference Endpoints conventions: the model repository is mounted at /repository,
# MODEL_ID=/repository, the server listens on port 80, /health answers 200 only once the model is loaded.
#
#   docker build --platform linux/amd64 -t tgi-space .
#   docker run --gpus all -p 8080:80 -v "$PWD/models/my-space-model:/repository" tgi-space --speculate-mode space
#
# Pinned: TGI v3.3.7 (December 2025, the last upstream release; TGI is in maintenance mode).
ARG TGI_IMAGE=ghcr.io/huggingface/text-generation-inference:3.3.7
# hadolint ignore=DL3029
FROM --platform=linux/amd64 ${TGI_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /usr/src/tgi-space
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY tgi_space ./tgi_space
COPY docker/entrypoint.sh /opt/tgi-space/entrypoint.sh

# Into TGI's virtual environment (VIRTUAL_ENV=/usr/src/.venv), without touching its torch:
# tgi-space itself with --no-deps, and only the few dependencies TGI's server does not ship.
# Installing writes console scripts into the venv; the two shims move to /opt/tgi-space/bin and
# TGI's own text-generation-server is put back, so each shim finds the original *later* on PATH.
RUN cp /usr/src/.venv/bin/text-generation-server /tmp/tgi-text-generation-server \
    && uv pip install --no-cache "fastapi>=0.110" "uvicorn>=0.29" "prometheus-client>=0.20" "typer>=0.12" "jinja2>=3.1" \
    && uv pip install --no-cache --no-deps . \
    && mkdir -p /opt/tgi-space/bin \
    && mv /usr/src/.venv/bin/text-generation-launcher /opt/tgi-space/bin/text-generation-launcher \
    && mv /usr/src/.venv/bin/tgi-space-text-generation-server /opt/tgi-space/bin/text-generation-server \
    && mv /tmp/tgi-text-generation-server /usr/src/.venv/bin/text-generation-server \
    && chmod +x /opt/tgi-space/entrypoint.sh

ENV MODEL_ID=/repository \
    PORT=80 \
    HOSTNAME=0.0.0.0 \
    PATH="/opt/tgi-space/bin:${PATH}"

EXPOSE 80
WORKDIR /usr/src
ENTRYPOINT ["/opt/tgi-space/entrypoint.sh"]
