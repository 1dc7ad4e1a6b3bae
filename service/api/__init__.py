"""The HTTP door: FastAPI routes, request parsing, the response schemas, middleware."""
