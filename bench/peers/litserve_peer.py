"""The framework peer: the same MeTTA computation served by LitServe with its dynamic batching.

`--variant eager`: what a LitServe user writes — torchvision views on PIL in `decode_request`,
the eager fp32 module in `predict`. `--variant ours`: this project's fast path inside LitServe —
our decoder, view planning and rendering (the `ImageJob` code) and our `LoadedModel` (OpenVINO on
CPU) — so the difference to metta-serve is serving overhead alone. Batches are of requests
(`max_batch_size`, `batch_timeout`), each bringing S crops; `unbatch` averages each request's views.

    python -m bench.peers.litserve_peer --port 8002 --variant ours --max-batch-size 8 --batch-timeout 0.05
"""

from __future__ import annotations

import argparse
import base64
from typing import Any

import litserve as ls
import torch


class MettaAPI(ls.LitAPI):
    def __init__(self, variant: str, model_name: str, threads: int, random_weights: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.variant, self.model_name, self.threads, self.random_weights = variant, model_name, threads, random_weights

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        if self.variant == "eager":
            from bench.peers.common import eager_model

            self.model, self.transform = eager_model(self.model_name, self.random_weights)
        else:
            from models import ModelOptions, create_model

            self.loaded = create_model(self.model_name, ModelOptions(threads=self.threads,
                                                                      random_weights=self.random_weights))

    def decode_request(self, request):  # unannotated: LitServe passes the JSON
        samples, seed = int(request.get("samples", 8)), int(request.get("seed", 0))
        views = []
        for data in request["images"]:
            if self.variant == "eager":
                from bench.peers.common import pil_image, torchvision_views

                views.append(torchvision_views(pil_image(data), self.transform, samples))
            else:
                from service.core.decode import decode_image
                from service.core.embedding import EmbedOptions, ImageJob
                from service.core.policies import CropFlipPolicy
                from service.core.render import render_view

                image = decode_image(base64.b64decode(data), max_pixels=40_000_000, max_side=12_000)
                job = ImageJob(image, EmbedOptions(samples, CropFlipPolicy(), seed), self.loaded)
                pre = self.loaded.spec.preprocess
                views.append(torch.stack([render_view(job.source, v, pre) for v in job.render_views]))
        return torch.cat(views), len(request["images"]), samples

    def batch(self, inputs: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        return torch.cat([x for x, _, _ in inputs]), [(n, s) for _, n, s in inputs]

    def predict(self, x: Any) -> tuple[torch.Tensor, Any]:
        views, shapes = x if isinstance(x, tuple) and isinstance(x[1], list) else (x[0], [(x[1], x[2])])
        if self.variant == "eager":
            with torch.no_grad():
                out = self.model(views)
        else:
            out = self.loaded.embed_views(views)
        return out, shapes

    def unbatch(self, output: tuple[torch.Tensor, list[tuple[int, int]]]) -> list[torch.Tensor]:
        out, shapes = output
        means, start = [], 0
        for n, s in shapes:
            means.append(out[start:start + n * s].view(n, s, -1).mean(1))
            start += n * s
        return means

    def encode_response(self, output: Any) -> dict[str, Any]:
        means = output[0] if isinstance(output, tuple) else output
        return {"data": [{"index": i, "embedding": m.tolist()} for i, m in enumerate(means)]}


def main() -> None:
    parser = argparse.ArgumentParser(description="LitServe MeTTA peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--variant", choices=("eager", "ours"), default="ours")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per batch")
    parser.add_argument("--batch-timeout", type=float, default=0.05, help="seconds to wait for a batch to fill")
    args = parser.parse_args()
    api = MettaAPI(args.variant, args.model, args.threads, args.random_weights, api_path="/v1/embeddings",
                   max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(host=args.host, port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
