# The project image every node of a cluster runs (study/cluster/*.yaml): Ray's GPU image with
# Python 3.11, CUDA and ray[default] (dashboard and jobs API), plus this project and the cloud
# SDKs the head's autoscaler needs (boto3 for AWS, the Google API client for GCP), every package at
# the version pinned in study/cluster/image-constraints.txt. From the repository root:
#
#   docker build -t ghcr.io/YOUR-ORG/glioma-survival-study:0.1.0 .
#   docker login ghcr.io -u GITHUB-USER     # password: a GitHub token with write:packages
#   docker push ghcr.io/YOUR-ORG/glioma-survival-study:0.1.0
#
# Then put that tag in study/cluster/{aws,gcp}.yaml (docker.image) and kuberay.yaml (image).
# The filled-in study/cluster/tracking.env never enters the image (.dockerignore).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/glioma-survival-study
# Dependencies first, in their own layer: a code change does not reinstall torch. The constraints
# file fixes every direct dependency's version, so two builds of one commit install the same.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users study/cluster/image-constraints.txt study/cluster/image-constraints.txt
RUN mkdir -p datasets trainables study search_spaces analysis \
    && pip install --no-cache-dir -c study/cluster/image-constraints.txt ".[cluster]" \
    && pip uninstall -y glioma-survival-study
COPY --chown=ray:users . .
RUN pip install --no-cache-dir --no-deps -e .
