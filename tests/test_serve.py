"""`sft serve` over real HTTP on a loopback port: concurrent clients mixing pairs get exactly what a fresh
one-shot `compose` answers; every bad input gets its status; a failing swap leaves the previous pair
intact; metrics move; SIGTERM lets in-flight requests finish."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from sftstore.compose import ComposedModel, compose  # noqa: E402
from sftstore.errors import BaseModelMismatchError  # noqa: E402
from sftstore.delta import SparseDelta  # noqa: E402
from sftstore.demo import NER_LABELS, build_tiny_base, synthetic_delta  # noqa: E402
from sftstore.modeling import base_parameters, head_parameters, load_model, load_tokenizer  # noqa: E402
from sftstore.predict import predict  # noqa: E402
from sftstore.serve.cache import DeltaCache  # noqa: E402
from sftstore.serve.runner import ServeOptions, build_app, listen  # noqa: E402
from sftstore.serve.scheduler import QueueFull, Scheduler  # noqa: E402
from sftstore.settings import base_key  # noqa: E402
from sftstore.store import DeltaStore  # noqa: E402

NLI_LABELS = ["entailment", "neutral", "contradiction"]
TEXTS = ["buhari ya ziyarci kano da abuja", "john said the president was in lagos", "da", "shugaban kasar najeriya"]
PAIRS = [("ner", "hau"), ("ner", "swa"), ("nli", "yor"), ("ner", None), ("nli", "hau"), ("ner", "yor")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BERT base saved with its pooler (so a sequence-classification head loads the same every time),
    a store with two tasks, three languages and one delta made for another base."""
    root = tmp_path_factory.mktemp("serve")
    tiny = build_tiny_base(root / "tiny")
    base = root / "base"
    load_model(tiny).save_pretrained(base)
    load_tokenizer(tiny).save_pretrained(base)
    store = DeltaStore(root / "store")
    ner = load_model(base, "token-classification", NER_LABELS)
    store.add(synthetic_delta(ner, 0.1, 1, kind="task", task="ner", task_type="token-classification", labels=NER_LABELS),
              source={"type": "test"})
    nli = load_model(base, "sequence-classification", NLI_LABELS)
    store.add(synthetic_delta(nli, 0.1, 2, kind="task", task="nli", task_type="sequence-classification",
                              labels=NLI_LABELS), source={"type": "test"})
    for seed, language in enumerate(("hau", "swa", "yor"), start=3):  # dense enough to overlap the tasks
        store.add(synthetic_delta(ner, 0.3, seed, kind="language", language=language), source={"type": "test"})
    other = load_model(build_tiny_base(root / "other", seed=9), "token-classification", NER_LABELS)
    store.add(synthetic_delta(other, 0.1, 7, kind="language", language="fra", base_id=base_key(base)),
              source={"type": "test"})
    return SimpleNamespace(base=base, store=store)


class Server:
    """A uvicorn server for `app` on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.socket = listen("127.0.0.1", 0)
        self.port = self.socket.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def call(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, object]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else text

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


def options(world, **overrides) -> ServeOptions:
    settings = dict(base=str(world.base), device="cpu", max_batch=4, max_inputs=8, max_input_chars=200, max_wait_ms=20)
    return ServeOptions(**{**settings, **overrides})


@pytest.fixture(scope="module")
def server(world):
    running = Server(build_app(options(world, preload=("task/ner", "lang/hau")), world.store))
    yield running
    running.stop()


class OneShot:
    """Fresh one-shot compositions of each pair (made once per pair) and what they predict."""

    def __init__(self, world) -> None:
        self.world = world
        self._composed: dict[Hashable, ComposedModel] = {}

    def composed(self, task: str, lang: str | None) -> ComposedModel:
        if (task, lang) not in self._composed:
            refs = [f"task/{task}"] + ([f"lang/{lang}"] if lang else [])
            deltas = [self.world.store.load(ref, str(self.world.base)) for ref in refs]
            self._composed[task, lang] = compose(self.world.base, deltas, device="cpu")
        return self._composed[task, lang]

    def answer(self, task: str, lang: str | None, texts: list[str]) -> list[dict]:
        composed = self.composed(task, lang)
        task_type = composed.deltas[0].config.task_type
        return [p.to_dict() for p in predict(composed.model, composed.tokenizer, texts, task_type)]


@pytest.fixture(scope="module")
def one_shot(world):
    return OneShot(world)


def request(task: str, lang: str | None, texts: list[str]) -> dict:
    return {"task": task, "inputs": texts, **({"lang": lang} if lang else {})}


def metric(server: Server, name: str, **labels) -> float:
    """The value of one sample of the server's /metrics (0 when absent)."""
    _, text = server.call("GET", "/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def assert_resident_is_one_shot(server: Server, one_shot: OneShot, task: str, lang: str | None) -> None:
    """The resident model's weights (base and head) are bit-identical to a fresh compose of the pair."""
    engine = server.app.state.engine
    assert engine.resident.refs()["task"].startswith(f"task/{task}@")
    assert (engine.resident.language is None) == (lang is None)
    reference = one_shot.composed(task, lang).model
    served = {**base_parameters(engine.model), **head_parameters(engine.model)}
    expected = {**base_parameters(reference), **head_parameters(reference)}
    for name, param in expected.items():
        assert torch.equal(served[name], param), name


def test_concurrent_clients_mixing_pairs_get_one_shot_answers(server, one_shot):
    swaps_before = metric(server, "sft_swaps_total", kind="language")
    jobs = [(PAIRS[(client + i) % len(PAIRS)], TEXTS[: 1 + (client + i) % len(TEXTS)]) for client in range(6)
            for i in range(4)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda job: server.call("POST", "/v1/predict", request(*job[0], job[1])), jobs))
    for ((task, lang), texts), (status, body) in zip(jobs, answers):
        assert status == 200, body
        assert body["task"] == f"task/{task}@1" and body["lang"] == (f"lang/{lang}@1" if lang else None)
        assert body["predictions"] == one_shot.answer(task, lang, texts)
    assert metric(server, "sft_swaps_total", kind="language") > swaps_before
    for task, lang in PAIRS:
        sent = sum(1 for pair, _ in jobs if pair == (task, lang))
        assert metric(server, "sft_requests_total", task=f"task/{task}@1", lang=f"lang/{lang}@1" if lang else "",
                      status="200") >= sent
    resident = server.app.state.engine.resident
    assert_resident_is_one_shot(server, one_shot, resident.task.name,
                                resident.language.name if resident.language else None)


def test_answers_are_word_level_entities_and_labels_with_float_scores(server):
    status, body = server.call("POST", "/v1/predict", request("ner@1", "ha", ["buhari ya ziyarci kano"]))
    assert status == 200 and body["lang"] == "lang/hau@1"  # ISO 639-1 `ha` finds lang/hau
    for entity in body["predictions"][0]["entities"]:
        assert "buhari ya ziyarci kano"[entity["start"]:entity["end"]] == entity["text"]
        assert isinstance(entity["score"], float) and entity["label"] in {"PER", "ORG", "LOC"}
    status, body = server.call("POST", "/v1/predict", request("nli", None, ["da"]))
    assert status == 200 and body["task_type"] == "sequence-classification"
    [prediction] = body["predictions"]
    assert set(prediction["scores"]) == set(NLI_LABELS) and prediction["label"] in NLI_LABELS
    assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-6)


BAD = {
    "unknown task": (request("pos", "hau", ["x"]), 404),
    "unknown language": (request("ner", "zu", ["x"]), 404),
    "unknown version": (request("ner@7", None, ["x"]), 404),
    "delta for another base": (request("ner", "fra", ["x"]), 409),
    "no inputs": (request("ner", None, []), 422),
    "inputs not texts": ({"task": "ner", "inputs": ["ok", 3]}, 422),
    "inputs missing": ({"task": "ner"}, 422),
    "unknown field": ({"task": "ner", "inputs": ["x"], "langs": "hau"}, 422),
    "task not a string": ({"task": ["ner"], "inputs": ["x"]}, 422),
    "a language as the task": (request("lang/hau", None, ["x"]), 422),
    "malformed ref": (request("ner@", None, ["x"]), 422),
    "too many inputs": (request("ner", None, ["x"] * 9), 413),
    "too long an input": (request("ner", None, ["x" * 201]), 413),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_gets_its_status_and_one_line(server, case):
    body, expected = BAD[case]
    status, answer = server.call("POST", "/v1/predict", body)
    assert status == expected, answer
    assert isinstance(answer["detail"], str) and "\n" not in answer["detail"]
    if expected == 413:
        assert answer["limits"] == {"max_inputs": 8, "max_input_chars": 200}
    if expected == 409:
        assert answer["detail"].startswith("lang/fra@1 was made for another base model")


def test_not_found_names_the_refs_it_tried(server):
    _, answer = server.call("POST", "/v1/predict", request("ner", "zu", ["x"]))
    assert answer["tried"] == ["lang/zu", "lang/zul"]
    _, answer = server.call("POST", "/v1/predict", request("ner@7", None, ["x"]))
    assert answer["tried"] == ["task/ner@7"] and "known: 1" in answer["detail"]


def test_malformed_json_and_oversized_bodies(server, one_shot):
    status, answer = server.call("POST", "/v1/predict", raw=b'{"task": "ner", "inputs": [')
    assert status == 422 and answer["detail"].startswith("malformed JSON")
    status, answer = server.call("POST", "/v1/predict", raw=b"\xff\xfe")
    assert status == 422
    status, answer = server.call("POST", "/v1/predict", raw=b" " * 200_000)
    assert status == 413 and "bytes" in answer["detail"]
    status, answer = server.call("POST", "/v1/predict", request("ner", "swa", TEXTS))  # and still serving right
    assert status == 200 and answer["predictions"] == one_shot.answer("ner", "swa", TEXTS)


@pytest.mark.parametrize("failing", [("ner", "yor"), ("nli", "yor")], ids=["language swap", "task and language swap"])
def test_a_swap_failing_midway_leaves_the_previous_pair_intact(server, one_shot, monkeypatch, failing):
    assert server.call("POST", "/v1/predict", request("ner", "hau", TEXTS))[0] == 200
    original = SparseDelta.apply

    def apply(self, *args, **kwargs):  # fails once the old deltas are reverted, before yor is added
        if self.name == "yor":
            raise RuntimeError("device out of memory (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SparseDelta, "apply", apply)
    status, answer = server.call("POST", "/v1/predict", request(*failing, TEXTS))
    assert status == 500 and "out of memory" in answer["detail"]
    assert_resident_is_one_shot(server, one_shot, "ner", "hau")
    assert server.call("POST", "/v1/predict", request("ner", "hau", TEXTS))[1]["predictions"] == \
        one_shot.answer("ner", "hau", TEXTS)
    monkeypatch.setattr(SparseDelta, "apply", original)
    status, answer = server.call("POST", "/v1/predict", request(*failing, TEXTS))
    assert status == 200 and answer["predictions"] == one_shot.answer(*failing, TEXTS)
    assert_resident_is_one_shot(server, one_shot, *failing)


def test_deltas_healthz_and_metrics(server):
    status, listing = server.call("GET", "/v1/deltas")
    assert status == 200 and listing["base"] == base_key(server.app.state.engine.base_id)
    rows = {row["ref"]: row for row in listing["deltas"]}
    assert {"task/ner@1", "task/nli@1", "lang/hau@1", "lang/swa@1", "lang/yor@1", "lang/fra@1"} == set(rows)
    assert rows["task/ner@1"]["task_type"] == "token-classification" and rows["task/ner@1"]["servable"]
    assert rows["task/ner@1"]["cached"]  # preloaded
    status, health = server.call("GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["device"] == "cpu"
    before = {name: metric(server, name) for name in ("sft_batch_inputs_count", "sft_request_seconds_count")}
    misses = metric(server, "sft_delta_cache_total", event="miss")
    assert server.call("POST", "/v1/predict", request("pos", None, ["x"]))[0] == 404  # counted, not this test's order
    before["sft_request_seconds_count"] += 1
    assert server.call("POST", "/v1/predict", request("nli", "swa", TEXTS))[0] == 200
    assert metric(server, "sft_batch_inputs_count") == before["sft_batch_inputs_count"] + 1
    assert metric(server, "sft_request_seconds_count") == before["sft_request_seconds_count"] + 1
    assert metric(server, "sft_delta_cache_bytes") > 0
    assert metric(server, "sft_delta_cache_total", event="miss") >= misses
    assert metric(server, "sft_requests_total", task="", lang="", status="404") >= 1


def test_the_cache_is_bounded_by_bytes_least_recently_used_out():
    sizes = {"a": 10, "b": 20, "c": 30}
    loaded, events = [], []

    def load(key):
        loaded.append(key)
        return SimpleNamespace(params={}, head={"w": torch.zeros(sizes[key], dtype=torch.uint8)})

    cache = DeltaCache(50, load, events.append)
    cache.get("a"), cache.get("b"), cache.get("a")
    cache.get("c")  # 60 bytes: b, the least recently used, goes
    assert "b" not in cache and "a" in cache and cache.bytes == 40
    cache.get("b", pinned=["a", "c"])  # over the bound, but a and c are pinned
    assert cache.bytes == 60 and len(cache) == 3
    assert loaded == ["a", "b", "c", "b"] and events.count("eviction") == 1 and events.count("hit") == 1


def test_the_worker_serves_the_resident_pair_first_but_never_starves_another():
    pair = {name: SimpleNamespace(key=name) for name in ("resident", "other")}
    engine = SimpleNamespace(resident=pair["resident"])
    scheduler = Scheduler(engine, None, max_batch=3, max_wait=3600)
    scheduler.submit(pair["other"], ["o1"])
    for texts in (["r1", "r2"], ["r3"], ["r4"]):
        scheduler.submit(pair["resident"], texts)
    assert scheduler._choose() == "resident"  # the other request has not waited long
    assert [job.texts for job in scheduler._take("resident")] == [["r1", "r2"], ["r3"]]  # 3 inputs at most
    scheduler.max_wait = 0  # the other pair's request has now waited too long
    assert scheduler._choose() == "other"
    big = scheduler.submit(pair["other"], ["x"] * 7)  # more than max_batch: taken alone, run in chunks
    assert [job.texts for job in scheduler._take("other")] == [["o1"]]
    assert [len(job.texts) for job in scheduler._take("other")] == [7] and not big.done()


def test_the_queue_is_bounded_and_a_request_over_the_bound_is_refused():
    pair = SimpleNamespace(key="pair")
    scheduler = Scheduler(SimpleNamespace(resident=None), None, max_batch=8, max_wait=1, max_queued=3)
    scheduler.submit(pair, ["a", "b"])
    with pytest.raises(QueueFull, match="2 inputs are waiting \\(at most 3\\)"):
        scheduler.submit(pair, ["c", "d"])
    scheduler.submit(pair, ["c"])
    assert scheduler.queued_inputs() == 3
    scheduler._take("pair")
    assert scheduler.queued_inputs() == 0
    scheduler.submit(pair, ["x"] * 5)  # alone in an empty queue: taken even over the bound
    assert scheduler.queued_inputs() == 5


def test_a_pair_that_one_shot_compose_refuses_is_refused_by_the_server(world, tmp_path):
    """The shared encoder keeps BERT's pooler, which token classification does not build: a language delta
    touching it composes with the sequence-classification task and is refused (409) with the NER task, as a
    one-shot compose does."""
    store = DeltaStore(tmp_path / "store")
    for ref in ("task/ner", "task/nli"):
        store.import_directory(world.store.export(ref, tmp_path / ref.replace("/", "-"), str(world.base)))
    encoder = load_model(world.base)
    pooled = synthetic_delta(encoder, 0.3, 11, kind="language", language="pol")
    assert any(name.startswith("pooler.") for name in pooled.params)
    store.add(pooled, source={"type": "test"})
    with pytest.raises(BaseModelMismatchError, match="'pooler."):
        compose(world.base, [store.load("task/ner", str(world.base)), pooled], device="cpu")
    running = Server(build_app(options(world), store))
    try:
        status, body = running.call("POST", "/v1/predict", request("ner", "pol", ["da kano"]))
        assert status == 409 and "parameter 'pooler." in body["detail"] and "one-shot compose" in body["detail"]
        assert running.call("POST", "/v1/predict", request("nli", "pol", ["da kano"]))[0] == 200
        assert running.call("POST", "/v1/predict", request("ner", None, ["da kano"]))[0] == 200
    finally:
        running.stop()


def hold_predictions(running: Server, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the model worker wait inside each prediction until `release` is set; `entered` is set once it waits."""
    engine = running.app.state.engine
    entered, release = threading.Event(), threading.Event()
    original = engine.predict

    def slow_predict(texts):
        entered.set()
        release.wait(30)
        return original(texts)

    monkeypatch.setattr(engine, "predict", slow_predict)
    return entered, release


def test_an_overloaded_server_answers_503_with_retry_after(world, monkeypatch):
    running = Server(build_app(options(world, max_queued_inputs=2), world.store))
    entered, release = hold_predictions(running, monkeypatch)
    try:
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(running.call, "POST", "/v1/predict", request("ner", "hau", ["da kano"]))
            assert entered.wait(30)  # the worker holds the first request
            queued = pool.submit(running.call, "POST", "/v1/predict", request("ner", "hau", ["da", "kano"]))
            deadline = time.monotonic() + 30
            while running.app.state.scheduler.queued_inputs() < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)
            connection.request("POST", "/v1/predict", body=json.dumps(request("ner", "hau", ["da"])),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            body = json.loads(response.read())
            connection.close()
            assert response.status == 503 and response.getheader("Retry-After") == "1"
            assert "the server is busy: 2 inputs are waiting (at most 2)" in body["detail"]
            release.set()
            assert busy.result(30)[0] == 200 and queued.result(30)[0] == 200
    finally:
        release.set()
        running.stop()


def test_sigterm_lets_the_request_in_flight_finish(world, monkeypatch):
    running = Server(build_app(options(world), world.store))
    entered, release = hold_predictions(running, monkeypatch)
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(running.call, "POST", "/v1/predict", request("ner", "hau", ["da kano"]))
            assert entered.wait(30)
            status, health = running.call("GET", "/healthz")  # the HTTP side answers while the model works
            assert status == 200 and health["resident"] == {"task": "task/ner@1", "lang": "lang/hau@1"}
            running.uvicorn.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler does
            time.sleep(0.2)
            release.set()
            status, body = answer.result(30)
    finally:  # a failed assertion must not leave the worker waiting and the server running
        release.set()
        running.stop()
    assert status == 200 and len(body["predictions"]) == 1
    running.thread.join(30)
    assert not running.thread.is_alive() and not running.app.state.scheduler.alive
    with pytest.raises(ConnectionRefusedError):
        running.call("GET", "/healthz")


def test_sft_serve_starts_from_the_command_line_and_stops_on_sigterm(world):
    env = {**os.environ, "SFTSTORE_HOME": str(world.store.root), "SFTSTORE_BASE": str(world.base)}
    process = subprocess.Popen([sys.executable, "-m", "sftstore_cli.main", "serve", "--port", "0", "--device", "cpu",
                                "--preload", "task/ner"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving "), process.stderr.read() if process.poll() is not None else line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                connection.request("GET", "/healthz")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert json.loads(connection.getresponse().read())["status"] == "ok"
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down cleanly
        log = process.stderr.read()
        assert "Shutting down" in log and "Application shutdown complete" in log and "Traceback" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_merged_requests_share_one_forward_pass_and_agree_with_one_shot(world, one_shot, monkeypatch):
    running = Server(build_app(options(world, merge_requests=True, max_batch=32), world.store))
    try:
        engine, scheduler = running.app.state.engine, running.app.state.scheduler
        original, texts = engine.predict, [TEXTS[: 1 + i % len(TEXTS)] for i in range(6)]
        waiting, entered = sum(len(t) for t in texts[1:]), threading.Event()

        def first_waits_for_the_rest(batch):  # the first request holds the worker until the others are queued
            if not entered.is_set():
                entered.set()
                deadline = time.monotonic() + 30
                while scheduler.queued_inputs() < waiting and time.monotonic() < deadline:
                    time.sleep(0.01)
            return original(batch)

        monkeypatch.setattr(engine, "predict", first_waits_for_the_rest)
        with ThreadPoolExecutor(len(texts)) as pool:
            first = pool.submit(running.call, "POST", "/v1/predict", request("ner", "hau", texts[0]))
            assert entered.wait(30)
            rest = list(pool.map(lambda t: running.call("POST", "/v1/predict", request("ner", "hau", t)), texts[1:]))
            answers = [first.result(30), *rest]
        for batch, (status, body) in zip(texts, answers):
            assert status == 200
            expected = one_shot.answer("ner", "hau", batch)
            got = body["predictions"]
            assert [[(e["label"], e["start"], e["end"]) for e in p["entities"]] for p in got] == \
                [[(e["label"], e["start"], e["end"]) for e in p["entities"]] for p in expected]
            assert [e["score"] for p in got for e in p["entities"]] == \
                pytest.approx([e["score"] for p in expected for e in p["entities"]], rel=1e-5)
        assert metric(running, "sft_batch_inputs_count") == 2  # the first request, then the other five together
        assert metric(running, "sft_batch_inputs_sum") == sum(len(t) for t in texts)
    finally:
        running.stop()
