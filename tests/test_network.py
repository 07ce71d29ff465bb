"""Every command that talks to the Hub fails with one clear line when nothing answers; so do bad paths.

The Hub endpoint is a closed port on 127.0.0.1: connections are refused at once, as with no network.
"""

from __future__ import annotations

import re
import socket
from typing import NamedTuple

import pytest
from click.testing import CliRunner

from hub_server import DEFAULT_TOKEN, apply_hub_environment
from sftstore import SftError, SparseDelta
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import load_model
from sftstore.store import DeltaStore
from sftstore_cli.main import cli

HUB_BASE = "tester/tiny-base"  # a base model named by a Hub id: loading it needs the Hub


class ClosedHub(NamedTuple):
    endpoint: str
    token: str = DEFAULT_TOKEN


@pytest.fixture
def closed_hub(tmp_path, monkeypatch) -> str:
    """`huggingface_hub` pointed at a port nothing listens on; returns the endpoint, credentials included."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://user:SECRET@127.0.0.1:{port}"
    apply_hub_environment(monkeypatch, ClosedHub(endpoint), tmp_path / "hf-home")
    return endpoint


@pytest.fixture
def stored(tiny_bert_dir, tmp_path, monkeypatch):
    """lang/hau and task/ner for the local tiny base and for the same weights named by a Hub id."""
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    store = DeltaStore()
    for base_id in (str(tiny_bert_dir.resolve()), HUB_BASE):
        for delta in (synthetic_delta(model, 0.05, 1, kind="language", language="hau"),
                      synthetic_delta(model, 0.05, 2, kind="task", task="ner", task_type="token-classification",
                                      labels=NER_LABELS)):
            delta.config.base_model.id = base_id
            store.add(delta)
    registry = tmp_path / "registry.json"
    registry.write_text('{"schema_version": 1, "entries": [{"base_model": "%s", "kind": "language", "name": "yor", '
                        '"repo_id": "tester/yor", "revision": "main", "format": "sftstore", "source": "test", '
                        '"verified": true}]}' % tiny_bert_dir.resolve())
    monkeypatch.setenv("SFTSTORE_REGISTRY", str(registry))
    return store


def commands(tiny_bert_dir, text_file, conll_file) -> dict[str, list[str]]:
    local = str(tiny_bert_dir.resolve())
    return {
        "pull": ["pull", "tester/anything"],
        "push": ["push", "lang/hau@1", "--repo", "tester/hau", "--base", local],
        "compose pulling through the registry": ["compose", "--base", local, "--lang", "yor"],
        "compose with a Hub base": ["compose", "--base", HUB_BASE, "--task", "ner", "--lang", "hau", "--no-pull"],
        "train-lang with a Hub base": ["train-lang", "--base", HUB_BASE, "--lang", "hau", "--text", text_file,
                                       "--max-steps", "1", "--no-progress"],
        "train-task with a Hub base": ["train-task", "--base", HUB_BASE, "--task", "ner", "--train", conll_file,
                                       "--dev", conll_file, "--max-steps", "1", "--no-progress"],
        "eval with a Hub base": ["eval", "--base", HUB_BASE, "--task", "ner", "--lang", "hau", "--data", conll_file],
    }


@pytest.mark.parametrize("name", ["pull", "push", "compose pulling through the registry", "compose with a Hub base",
                                  "train-lang with a Hub base", "train-task with a Hub base", "eval with a Hub base"])
def test_a_hub_that_does_not_answer_is_one_clear_line(closed_hub, stored, tiny_bert_dir, tmp_path, name):
    text, conll = tmp_path / "hau.txt", tmp_path / "en.conll"
    text.write_text("sannu da zuwa\n" * 20)
    conll.write_text("Peter B-PER\nlives O\nin O\nBerlin B-LOC\n\n" * 4)
    result = CliRunner().invoke(cli, commands(tiny_bert_dir, str(text), str(conll))[name])
    port = closed_hub.rsplit(":", 1)[1]
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert f"cannot reach the Hub at http://127.0.0.1:{port} (ConnectError" in result.output
    assert "HF_HUB_OFFLINE=1" in result.output and "SECRET" not in result.output


def test_the_python_api_raises_the_projects_error(closed_hub):
    with pytest.raises(SftError, match="tester/anything: cannot reach the Hub"):
        SparseDelta.from_pretrained("tester/anything")
    with pytest.raises(SftError, match="base model 'tester/tiny-base': cannot reach the Hub"):
        load_model(HUB_BASE)


@pytest.mark.parametrize("make_target", [
    lambda tmp: "a\0b",
    lambda tmp: str(tmp / "a-file" / "out"),
], ids=["nul-byte", "under-a-file"])
@pytest.mark.parametrize("command", ["export", "compose --out", "demo --workdir"])
def test_an_unusable_path_is_one_clear_line(stored, tiny_bert_dir, tmp_path, make_target, command):
    (tmp_path / "a-file").write_text("not a directory")
    target = make_target(tmp_path)
    args = {"export": ["export", "lang/hau@1", target, "--base", str(tiny_bert_dir)],
            "compose --out": ["compose", "--base", str(tiny_bert_dir), "--lang", "hau", "--out", target],
            "demo --workdir": ["demo", "--quick", "--workdir", target]}[command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    last = result.output.splitlines()[-1]  # `demo` prints its steps first
    if "\0" in target:
        assert last.startswith("Error: a path or name contains a NUL byte"), result.output
    else:  # the path named is the target or a path inside it (`demo` makes its store there first)
        assert re.match(rf"Error: {re.escape(target)}(/[\w/]+)?: Not a directory \(a part", last), result.output


def test_an_unusable_store_index_is_one_line(store_home):
    store_home.mkdir(parents=True)
    (store_home / "index.sqlite").write_bytes(b"this is not a database" * 100)
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "index.sqlite: the store's index cannot be used" in result.output and "SFTSTORE_HOME" in result.output


def test_push_in_offline_mode_says_offline_mode_is_on(hub_env, stored):
    hub_env.set_offline()
    result = CliRunner().invoke(cli, ["push", "lang/hau@1", "--repo", "tester/hau", "--base", HUB_BASE])
    assert result.exit_code == 1 and "offline mode is on (HF_HUB_OFFLINE); unset it" in result.output, result.output


def test_a_network_failure_is_not_remembered(monkeypatch, closed_hub):
    from huggingface_hub import HfApi

    from sftstore.modeling import loading_base

    answers = [ConnectionError("down"), None]  # the network comes back

    def model_info(self, *args, **kwargs):
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    monkeypatch.setattr(HfApi, "model_info", model_info)
    with loading_base(HUB_BASE) as first:
        pass
    with loading_base(HUB_BASE) as second:
        pass
    assert first == {"local_files_only": True} and second == {} and answers == []
