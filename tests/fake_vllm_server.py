"""A loopback stand-in for `vllm serve MODEL --enable-lora` (with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True):
the routes sgsd uses, answered the way vLLM's OpenAI-compatible server answers them, and a record of
every request. It checks OUR side of the contract (routes, request bodies, which adapter each sampling
request used and what that adapter folder held when it was loaded); whether a real vLLM honours it is
for a machine that has vLLM.

    with FakeVLLMServer(reply=lambda prompt_ids, i: [5, 6, 2]) as server:
        generator = VLLMServerGenerator(server.url, tokenizer)
        ...
        server.loads        # [Load(name, path, tensors)]
        server.unloads      # [name]
        server.completions  # [Sample(model, body)]

Routes: GET /v1/models (the base model, then one card per loaded adapter with `parent` set),
POST /v1/load_lora_adapter {lora_name, lora_path} (400 if the name is loaded, 404 if the folder has no
adapter; reads the adapter's tensors at load time, as vLLM does), POST /v1/unload_lora_adapter
{lora_name} (404 if unknown), POST /v1/completions (token-id prompts; 404 for an unknown model; choices
numbered prompt by prompt, each with `token_ids` when `return_token_ids` is set). Error bodies are vLLM's
{"error": {"message", "type", "code"}}. `fail[route] = (status, body bytes)` makes a route answer that
instead, for error-path tests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BASE_MODEL = "base-model"


@dataclass
class Load:
    name: str
    path: str
    tensors: dict = field(default_factory=dict)  # the adapter's tensors when it was loaded


@dataclass
class Sample:
    model: str  # the base model or the adapter name the request sampled with
    body: dict  # the whole request body
    adapter: Load | None = None  # the loaded adapter behind `model` (None: the base model)


class FakeVLLMServer:
    """`reply(prompt_ids, sample_index) -> token ids` decides every completion; `decode(ids) -> text`
    its text (default: the ids joined); `finish` its finish_reason."""

    def __init__(
        self,
        reply: Callable[[list[int], int], list[int]],
        decode: Callable[[list[int]], str] | None = None,
        finish: str = "stop",
    ):
        self.reply, self.decode, self.finish = reply, decode or (lambda ids: " ".join(map(str, ids))), finish
        self.loaded: dict[str, Load] = {}
        self.loads: list[Load] = []
        self.unloads: list[str] = []
        self.completions: list[Sample] = []
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization) in order
        self.fail: dict[str, tuple[int, bytes]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeVLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the routes: (status, JSON-able body or raw text)

    def models(self, _body):
        cards = [{"id": BASE_MODEL, "object": "model", "root": "/models/base", "parent": None}]
        cards += [
            {"id": n, "object": "model", "root": load.path, "parent": BASE_MODEL}
            for n, load in self.loaded.items()
        ]
        return 200, {"object": "list", "data": cards}

    def load(self, body):
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.loaded:
            return _error(400, f"The lora adapter '{name}' has already been loaded.")
        weights = Path(path) / "adapter_model.safetensors"
        if not weights.is_file():
            return _error(404, f"No adapter found for {path}")
        from safetensors.torch import load_file

        load = Load(name, path, load_file(str(weights)))
        self.loaded[name] = load
        self.loads.append(load)
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, body):
        name = body.get("lora_name")
        if name not in self.loaded:
            return _error(404, f"The lora adapter '{name}' cannot be found.")
        del self.loaded[name]
        self.unloads.append(name)
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def complete(self, body):
        model = body.get("model")
        if model != BASE_MODEL and model not in self.loaded:
            return _error(404, f"The model `{model}` does not exist.")
        prompts = body["prompt"]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        self.completions.append(Sample(model, body, self.loaded.get(model)))
        choices = []
        for prompt in prompts:
            for j in range(body.get("n", 1)):
                ids = list(self.reply(prompt, j))
                choice = {"index": len(choices), "text": self.decode(ids), "logprobs": None,
                          "finish_reason": self.finish, "stop_reason": None}  # fmt: skip
                if body.get("return_token_ids"):
                    choice.update(token_ids=ids, prompt_token_ids=list(prompt))
                choices.append(choice)
        choices.reverse()  # the client must order by "index", not by position
        return 200, {"id": "cmpl-1", "object": "text_completion", "model": model, "choices": choices}

    def _handler(self):
        server = self
        routes = {
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/load_lora_adapter"): self.load,
            ("POST", "/v1/unload_lora_adapter"): self.unload,
            ("POST", "/v1/completions"): self.complete,
        }

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append((method, self.path, self.headers.get("Authorization")))
                    if self.path in server.fail:
                        status, payload = server.fail[self.path]
                    elif (method, self.path) in routes:
                        status, payload = routes[(method, self.path)](body)
                    else:
                        status, payload = 404, {"detail": "Not Found"}  # FastAPI's own 404
                if not isinstance(payload, bytes):
                    payload = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def log_message(self, *args):
                pass

        return Handler


def _error(status: int, message: str):
    kind = "NotFoundError" if status == 404 else "BadRequestError"
    return status, {"error": {"message": message, "type": kind, "param": None, "code": status}}
