"""No secret is ever printed or written, whatever a server echoes or a URL holds; bad endpoints and repo ids
are one clear line; a silent server is given up on."""

from __future__ import annotations

import logging
import socket
import threading

import pytest
from click.testing import CliRunner

from hub_server import apply_hub_environment
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import load_model
from sftstore.redaction import redact, remember_secret
from sftstore.store import DeltaStore
from sftstore_cli.main import cli

OTHER_TOKEN = "hf_anotherUsersToken000000000000000"


@pytest.fixture
def stored(tiny_bert_dir):
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    DeltaStore().add(synthetic_delta(model, 0.05, 1, kind="language", language="hau"))


def files_hold(root, secret: str) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def test_a_server_echoing_the_token_never_gets_it_printed(hub_env, stored, store_home, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    hub_env.server.echo_headers = True
    hub_env.server.add_token(OTHER_TOKEN, "someone")
    hub_env.server.create_repo("someone/theirs", owner="someone")
    runner = CliRunner()
    results = [
        runner.invoke(cli, ["push", "lang/hau@1", "--repo", "someone/theirs"]),  # HF_TOKEN: no write rights
        runner.invoke(cli, ["push", "lang/hau@1", "--repo", "someone/theirs", "--token", OTHER_TOKEN[:-1] + "1"]),
        runner.invoke(cli, ["pull", "someone/missing"]),
        runner.invoke(cli, ["pull", "someone/theirs@nope", "--token", OTHER_TOKEN]),
    ]
    assert results[0].exit_code == 1 and "HTTP 403" in results[0].output and "you sent Authorization" in results[0].output
    for result in results:
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        for secret in (hub_env.token, OTHER_TOKEN, OTHER_TOKEN[:-1] + "1", "hf_"):
            assert secret not in result.output
    assert hub_env.token not in caplog.text and OTHER_TOKEN not in caplog.text
    assert files_hold(store_home, hub_env.token) == [] and files_hold(hub_env.hf_home, hub_env.token) == []


def test_credentials_in_the_endpoint_are_never_printed(hub_server, stored, tmp_path, monkeypatch, store_home):
    endpoint = hub_server.endpoint.replace("http://", "http://user:SECRET@")
    apply_hub_environment(monkeypatch, type("Server", (), {"endpoint": endpoint, "token": hub_server.token})(),
                          tmp_path / "hf-home")
    hub_server.echo_headers = True  # the client sends the URL's credentials as Basic auth: echoed back
    results = [CliRunner().invoke(cli, ["push", "lang/hau@1", "--repo", "tester/hau"]),
               CliRunner().invoke(cli, ["pull", "tester/hau"])]
    assert results[0].exit_code == 1 and "HTTP 401" in results[0].output and "Basic ***" in results[0].output
    assert results[1].exit_code == 1
    for result in results:
        assert result.output.count("\n") == 1 and "SECRET" not in result.output and "dXNlcjpTRUNSRVQ" not in result.output
    assert files_hold(store_home, "SECRET") == []


@pytest.mark.parametrize("endpoint", ["http://[::1", "ftp://hub.example.org", "hub.example.org", "https://", "",
                                      "https://hub.example.org:99999", "http://hub.example.org:abc",
                                      " https://huggingface.co"])
def test_an_invalid_endpoint_is_one_line_naming_the_variable(hub_env, monkeypatch, tmp_path, endpoint):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    text = tmp_path / "hau.txt"
    text.write_text("sannu\n")
    for command in (["pull", "tester/x"], ["train-lang", "--base", "tester/model", "--lang", "hau", "--text", str(text)]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        if endpoint:  # an empty value means the default Hub, whose absence this machine then reports
            assert "HF_ENDPOINT is" in result.output and "expected an http(s) URL" in result.output


def test_hub_style_repository_ids_are_accepted():
    from sftstore.naming import validate_repo_id

    for repo_id in ("org/model_", "_org/m", "Org-1/model.v2", "a/b"):
        assert validate_repo_id(repo_id) == repo_id


@pytest.mark.parametrize("repo_id", ["../../etc/passwd", "a/b/c", "noslash", "t\u0435ster/x", "a--b/c", "a/.b", "/x",
                                     "a/b-", "a/b."])
def test_an_invalid_repository_id_is_refused_before_any_request(hub_env, stored, repo_id):
    for command in (["pull", repo_id], ["push", "lang/hau@1", "--repo", repo_id]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert "invalid repository id" in result.output
    assert hub_env.server.requests == []


def test_a_silent_server_is_given_up_on(stored, tmp_path, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept_and_say_nothing():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        apply_hub_environment(monkeypatch, type("Server", (), {"endpoint": endpoint, "token": "hf_x" * 5})(),
                              tmp_path / "hf-home")
        monkeypatch.setenv("SFTSTORE_HUB_TIMEOUT", "0.5")
        result = CliRunner().invoke(cli, ["pull", "tester/anything"])
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()
    assert result.exit_code == 1 and "cannot reach the Hub" in result.output and "Timeout" in result.output


def test_redact_removes_known_secrets_tokens_and_url_credentials():
    remember_secret("my-private-token-value")
    text = ("my-private-token-value hf_abcdef123456 Authorization: Bearer xyz.abc123, "
            "https://alice:pw@host.example/path token=abc123")
    assert redact(text) == "*** *** Authorization: Bearer ***, https://host.example/path token=***"


@pytest.mark.parametrize("endpoint", ["http://[::1", "https://hub.example.org:99999"])
def test_an_invalid_endpoint_does_not_stop_local_commands(monkeypatch, endpoint):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for command in (["--help"], ["list"], ["search", "--lang", "hau"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, (command, result.output)


@pytest.mark.parametrize("value", ["inf", "nan", "soon"])
def test_an_invalid_hub_timeout_is_one_line_naming_the_variable(hub_env, monkeypatch, value):
    monkeypatch.setenv("SFTSTORE_HUB_TIMEOUT", value)
    result = CliRunner().invoke(cli, ["pull", "tester/x"])
    assert result.exit_code == 1 and f"SFTSTORE_HUB_TIMEOUT is '{value}'" in result.output, result.output


def test_redaction_leaves_ordinary_words_alone():
    for text in ("no valid token was given (pass --token, set HF_TOKEN)", "expected a token and a tag",
                 "Basic Multilingual Plane", "use --token or HF_TOKEN"):
        assert redact(text) == text
    assert redact("https://user:p@ss@host/x?access_token=abc123&b=1") == "https://host/x?access_token=***&b=1"


def test_a_usage_error_echoing_a_token_is_redacted(hub_env):
    result = CliRunner().invoke(cli, ["pull", "tester/x", "hf_AbCdEfGhIjKlMnOpQrSt"])
    assert result.exit_code == 2 and "unexpected extra argument" in result.output
    assert "hf_AbCdEfGhIjKlMnOpQrSt" not in result.output


def test_values_from_manifests_are_never_rich_markup(tiny_bert_dir):
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    delta = synthetic_delta(model, 0.05, 1, kind="language", language="hau")
    delta.config.metrics = {"[/x] [link=https://evil.example]click[/link]": 1.0}
    DeltaStore().add(delta)
    for command in (["list"], ["show", "lang/hau"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, result.output
    assert "[link=https://evil.example]click[/link]" in result.output  # shown as text, not as a link
