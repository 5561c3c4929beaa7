# sagan on a CUDA GPU: `docker build -t sagan .`, then see docs/docker.md.
# The base image brings Python 3.11, PyTorch 2.5.1 and torchvision built for CUDA 12.4 (driver >= 550
# on the host; run with --gpus all). pip keeps them and adds the rest of sagan's dependencies.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Caches (torch hub, where Inception weights may sit; sagan's FID reference features) live beside the
# runs, so they persist across containers and are writable whatever --user the container runs as.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    XDG_CACHE_HOME=/runs/.cache \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/sagan
COPY pyproject.toml README.md ./
COPY sagan_cli/ ./sagan_cli/
RUN pip install --no-cache-dir . && sagan --version
# Recipes stay in the image at /opt/sagan/recipes: `sagan train /opt/sagan/recipes/lsun.toml ...`.
COPY recipes/ ./recipes/

RUN useradd --create-home --uid 1000 --shell /bin/bash sagan \
    && mkdir -p /runs /data \
    && chown sagan:sagan /runs /data
USER sagan
VOLUME ["/runs", "/data"]
WORKDIR /runs

ENTRYPOINT ["sagan"]
CMD ["--help"]
