"""Generated gRPC stubs (python -m loraplex.protos); do not edit."""
