# The exported Triton model repository as an image, copied into a volume by the init containers
# of k8s/base (the gateway takes the sidecars and tokenizers) and k8s/triton (everything).
# The build context is the repository folder itself:
#   clipserve export --backend onnxruntime --tensorrt --repository model_repository   # GPU overlay
#   clipserve export --repository model_repository                                    # CPU overlay
#   docker build -f k8s/model-repository.Dockerfile -t clipserve-models:TAG model_repository
# Large repositories (ViT-L at four precisions is several GB) are better kept in object
# storage: Triton reads s3://, gs:// and as:// itself (README "## Deploy").
FROM busybox:1.36
# Files keep the modes export wrote them with (world-readable): the pods read them as uid 10001.
COPY . /models/
USER 10001:10001
