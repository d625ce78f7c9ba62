"""How long a normal /predict waits while other clients send heavy bodies (issue 14).

Run: .venv/bin/python benchmarks/serve_abuse.py ARTIFACT.ts
Starts `fxprune serve ARTIFACT` on a loopback port and, for each attack, sends seven
concurrent heavy requests together with one normal request (one JSON sample) and
prints the heavy requests' statuses and the normal request's latency:
  - eight all-zero 6000x6000 PNGs per request (288 MP: over the per-request budget);
  - one all-zero 6000x6000 PNG per request (36 MP: within the budget, decoded);
  - a (5000, 3, H, W) uint8 .npy body (over the per-request sample budget).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_serve import Server  # noqa: E402  (the subprocess helper the tests use)


def zero_png(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, "PNG")
    return buffer.getvalue()


async def attack(url: str, body: bytes, ctype: str, normal: dict) -> tuple[list[int], float]:
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as http:
        heavy = [http.post("/predict", content=body, headers={"content-type": ctype})
                 for _ in range(7)]  # fmt: skip
        tasks = [asyncio.ensure_future(h) for h in heavy]
        await asyncio.sleep(0.2)  # the heavy ones arrive first
        start = time.perf_counter()
        answer = await http.post("/predict", json=normal)
        waited = time.perf_counter() - start
        assert answer.status_code == 200, answer.text
        return [r.status_code for r in await asyncio.gather(*tasks)], waited


def main(artifact: Path) -> None:
    server = Server(artifact, "--max-body-mb", "16")
    try:
        shape = httpx.get(f"{server.url}/health", trust_env=False).json()["input_shape"]
        normal = {"inputs": np.zeros(shape[1:]).tolist()}
        png = base64.b64encode(zero_png(6000)).decode()
        npy = io.BytesIO()
        np.save(npy, np.zeros((5000, *shape[1:]), np.uint8))
        attacks = {
            "8 x 6000x6000 PNG": (json.dumps({"image": [png] * 8}).encode(), "application/json"),
            "1 x 6000x6000 PNG": (json.dumps({"image": png}).encode(), "application/json"),
            "(5000,C,H,W) uint8 npy": (npy.getvalue(), "application/octet-stream"),
        }
        for name, (body, ctype) in attacks.items():
            statuses, waited = asyncio.run(attack(server.url, body, ctype, normal))
            print(f"{name:24} {len(body) / 2**20:5.2f} MiB x7 -> {sorted(set(statuses))}; "
                  f"normal request waited {waited:.2f} s")  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
