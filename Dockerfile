# synthset on Ray: the image every KubeRay pod of k8s/*.yaml runs (head, workers, RayJob submitter).
#
#   docker build -t <registry>/synthset:0.1.0-cpu .                            # CPU torch (default)
#   docker build --build-arg CUDA=cu128 -t <registry>/synthset:0.1.0-gpu .     # CUDA torch, Ray's GPU base
#
# CUDA names a PyTorch wheel index (https://download.pytorch.org/whl/<CUDA>); set, it also switches the
# base to Ray's CUDA image. The repo is copied to /home/ray/synthset (the RayJobs' working_dir) and
# installed into the image's Python, so Ray workers import synthset without a runtime-env upload.
# The image runs as Ray's non-root user `ray` (uid 1000, gid 100); nothing secret is copied into it
# (.dockerignore; credentials arrive as environment variables from Kubernetes Secrets).
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG CUDA=
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}${CUDA:+-gpu}

ARG CUDA=
ARG TORCH_VERSION=2.13.0
USER ray
WORKDIR /home/ray/synthset

# torch first, from the CPU or CUDA index, so that `pip install .` finds its pin satisfied.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${CUDA:-cpu}" \
        "torch==${TORCH_VERSION}"

# Dependencies before the source, so editing code does not reinstall them.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform/ platform/
RUN pip install --no-cache-dir .

COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users conf/ conf/
COPY --chown=ray:users benchmarks/ benchmarks/

# A quick check at build time: the package and the job entrypoints import, the configs validate.
RUN python -c "import synthset.pipeline" \
 && python jobs/pipeline.py --config conf/tiny.yaml --set output.root=/tmp/dry --dry-run > /dev/null
