# A Ray node for `lvb compile --cluster` (README: Compiling on a cluster): lvb's checkout
# with both environments from `make setup`, so tasks find tpu-mlir in /opt/lvb/.venv-tpu.
# Ubuntu 22.04: Python 3.10 for tpu-mlir, and the glibc its wheel bundles.
#   docker build -t lvb-node .
#   docker run -d --network host --shm-size 8g lvb-node ray start --address HEAD:6379 --block
FROM ubuntu:22.04
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.10 python3.10-venv python3.11 python3.11-venv make ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/lvb
COPY . .
# The two environments of `make setup`; a node needs no browser for the web page's test.
RUN make .venv/.installed .venv-tpu/.installed PYTHON311=python3.11 PYTHON310=python3.10
ENV PATH=/opt/lvb/.venv/bin:$PATH
CMD ["ray", "start", "--head", "--port", "6379", "--block"]
