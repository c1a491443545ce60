# GPU image for the notebooks: NVIDIA's NGC PyTorch container (CUDA, cuDNN, TensorRT, JupyterLab)
# with this package installed. Build and run from the repository root:
#   docker build -t mrcnn .
#   docker run --gpus all --ipc=host -p 8888:8888 -v "$PWD/data:/workspace/mrcnn/data" \
#       -v "$PWD/results:/workspace/mrcnn/results" mrcnn
# then open the http://127.0.0.1:8888/lab?token=... address the container prints.
# --ipc=host: DataLoader workers share batches through /dev/shm, which Docker keeps at 64 MB.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.02-py3
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
