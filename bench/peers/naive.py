"""The naive peer: what a user writes first. One FastAPI endpoint; per request, S torchvision views on
PIL and one eager forward; no batching across requests (FastAPI runs the sync handler in its
thread pool, so concurrent requests run concurrent forwards).

    python -m bench.peers.naive --port 8001 [--model efficientnet_lite0] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from bench.peers.common import eager_model, pil_image, torchvision_views


class EmbeddingsRequest(BaseModel):
    images: list[str]
    samples: int = 8
    policy: str = "crop_flip"
    seed: int = 0


def create_app(model_name: str, random_weights: bool = False) -> FastAPI:
    model, transform = eager_model(model_name, random_weights)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    def embeddings(request: EmbeddingsRequest) -> dict[str, object]:
        data = []
        for index, image in enumerate(request.images):
            views = torchvision_views(pil_image(image), transform, request.samples)
            with torch.no_grad():
                mean = model(views).mean(0)
            data.append({"index": index, "embedding": mean.tolist()})
        return {"samples": request.samples, "data": data}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="naive MeTTA peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(create_app(args.model, args.random_weights), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
