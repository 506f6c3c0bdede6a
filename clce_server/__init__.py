"""clce server: the OpenCL loss engine behind a FastAPI service."""

__version__ = "0.1.0"
