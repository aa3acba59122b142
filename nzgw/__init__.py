"""nzgw: a secure, multi-tenant API gateway in front of Ollama, on Trio."""

__version__ = "0.1.0"
