"""temper: a Kubernetes operator for LLM post-training."""

__version__ = "0.1.0"
GROUP = "temper.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
