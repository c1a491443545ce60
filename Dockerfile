# GPU image for the notebooks: NVIDIA's NGC PyTorch container (CUDA, cuDNN, TensorRT, JupyterLab)
# with this package installed. Build and run from the repository root:
#   docker build -t mrcnn .
#   docker run --gpus all --ipc=host -p 8888:8888 -v "$PWD/data:/workspace/mrcnn/data" \
#       -v "$PWD/results:/workspace/mrcnn/results" mrcnn
# then open the http://127.0.0.1:8888/lab?token=... address the container prints.
# --ipc=host: DataLoader workers share batches through /dev/shm, which Docker keeps at 64 MB.
#
# Base: NGC PyTorch 26.05 = PyTorch 2.12.0a0, CUDA 13.2.1, TensorRT 10.16.1.11 (NVIDIA's 26.05
# release notes, as quoted by public projects). The engine code targets TensorRT 10.x and 11.x alike (strongly typed networks,
# INT8 from Q/DQ graphs; tools/trt_api_names.py checks its API names against 10.8, 10.16, 11.0
# and 11.4), so a later tag with TensorRT 11 works too: --build-arg BASE_IMAGE=<tag>. The old
# base, 25.02, had TensorRT 10.8.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.05-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/mrcnn
COPY . .
# torch and torchvision stay the base image's CUDA builds: they satisfy pyproject's lower bounds,
# so pip keeps them and installs only what the image lacks.
RUN python -m pip install --no-cache-dir -e ".[notebooks]"

EXPOSE 8888
WORKDIR /workspace/mrcnn/notebooks
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--allow-root", \
     "--ServerApp.root_dir=/workspace/mrcnn/notebooks"]
