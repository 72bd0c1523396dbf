"""`nanoseek serve`: an OpenAI-compatible API over the engine, with continuous batching and a web chat at `/`.
The package owns the HTTP side of generation: what goes over the wire (schemas), the worker that runs the engine
for the requests' jobs (worker), the bounds on what one client holds (guard), from a request to prompts and
sampling params (requests), server-sent events (stream), and the app, its routes and `serve` (app). It may
import anything of nanoseek below the CLI (engine, tokenizer, checkpoint, model, sampling, text, device, tasks);
nothing of nanoseek imports it but the CLI and the bench package (bench serve runs it as `nanoseek serve`), and
the web chat page (nanoseek/web) only talks to it over HTTP.
"""

from nanoseek.serve.app import create_app, serve
from nanoseek.serve.guard import allowed_hosts, uvicorn_config

__all__ = ["allowed_hosts", "create_app", "serve", "uvicorn_config"]
