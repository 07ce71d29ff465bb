"""Data readers, tokenised datasets and shipped data slices (sftstore.train.data)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
)

from sftstore.errors import SftError
from sftstore.train.data import (
    NER_DEFAULT_LABELS,
    NER_TARGET_MAP,
    NLI_LABELS,
    DataFormatError,
    MlmDataset,
    SentencePairDataset,
    TokenClassificationDataset,
    describe_files,
    label_list,
    map_entity_types,
    read_conll,
    read_conllu,
    read_nli_tsv,
    read_text_lines,
    sha256_of_files,
    shipped_data,
    shipped_files,
    split_held_out,
)

FIXTURES = Path(__file__).parent / "data"
NER_LABEL2ID = {label: i for i, label in enumerate(NER_DEFAULT_LABELS)}


@pytest.fixture(scope="module")
def minilm():
    """The real uncased WordPiece tokenizer of all-MiniLM-L6-v2, the demo's base (files in tests/data)."""
    return AutoTokenizer.from_pretrained(FIXTURES / "minilm-tokenizer")


@pytest.fixture(scope="module")
def xlmr_like():
    """A tiny fast tokenizer with XLM-R's layout: Unigram pieces with '▁', <s> ... </s>, no token types."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces += ["▁", "▁the", "▁Ka", "no", "▁cat", "▁sat", "a", "n", "o", "K", "t", "c", "h", "e", "s"]
    pieces += ["<mask>"]
    vocab = [(piece, 0.0 if piece.startswith("<") else -float(i)) for i, piece in enumerate(pieces)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_input_names=["input_ids", "attention_mask"],
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- shipped data


def test_shipped_files_are_listed_and_resolvable():
    names = shipped_files()
    for name in ["README.md", "mlm/en.txt", "mlm/hau.txt", "ner/en/train.txt", "ner/en/dev.txt",
                 "ner/hau/test.txt", "ner/hau/dev.txt"]:
        assert name in names
        assert shipped_data(name).is_file()
    assert all(shipped_data(name).stat().st_size < 410_000 for name in names)
    with pytest.raises(FileNotFoundError, match="ner/en/train.txt"):
        shipped_data("ner/xx/train.txt")
    with pytest.raises(ValueError):
        shipped_data("../train/data.py")


def test_shipped_ner_slices():
    en_train = read_conll(shipped_data("ner/en/train.txt"))
    en_dev = read_conll(shipped_data("ner/en/dev.txt"))
    hau_test = read_conll(shipped_data("ner/hau/test.txt"))
    hau_dev = read_conll(shipped_data("ner/hau/dev.txt"))
    assert (len(en_train), len(en_dev), len(hau_test), len(hau_dev)) == (1500, 300, 552, 276)
    assert sum(len(words) for words, _ in hau_test) == 16841  # the whole MasakhaNER hau test set
    assert sum(len(words) for words, _ in hau_dev) == 8301
    # -DOCSTART- lines are skipped; the 4-column file gives token and NER tag.
    assert en_train[0] == (
        ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
        ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"],
    )
    assert not any("-DOCSTART-" in words for words, _ in en_train + en_dev)
    assert "B-MISC" in label_list(en_train) and "B-DATE" in label_list(hau_test)
    with pytest.raises(DataFormatError, match="B-MISC"):
        label_list(en_train, NER_DEFAULT_LABELS, strict=True)
    # After the CoNLL -> MasakhaNER map both sides use exactly the 7 shared labels.
    for name in ["ner/en/train.txt", "ner/en/dev.txt", "ner/hau/test.txt", "ner/hau/dev.txt"]:
        mapped = read_conll(shipped_data(name), label_map=NER_TARGET_MAP)
        assert label_list(mapped, NER_DEFAULT_LABELS, strict=True) == NER_DEFAULT_LABELS


def test_shipped_mlm_text():
    en = read_text_lines(shipped_data("mlm/en.txt"))
    hau = read_text_lines(shipped_data("mlm/hau.txt"))
    assert (len(en), len(hau)) == (2590, 2240)
    assert all(line == line.strip() and line for line in en + hau)


# ----------------------------------------------------------------------------------------- CoNLL

CRAFTED = """\
-DOCSTART- -X- -X- O

On IN B-PP O
New NNP B-NP B-DATE
Year NNP I-NP I-DATE
's POS B-NP O
Day NNP I-NP O
German JJ B-NP B-MISC
Cup NNP I-NP I-MISC
fans NNS I-NP O
met VBD B-VP O
John NNP B-NP B-PER
Smith NNP I-NP I-PER
in IN B-PP O
Kano NNP B-NP B-LOC

Reuters NNP B-NP B-ORG
"""


def test_label_map_drops_misc_and_date_exactly(tmp_path):
    path = write(tmp_path, "crafted.txt", CRAFTED)
    raw = read_conll(path)
    assert len(raw) == 2
    assert raw[0][1] == ["O", "B-DATE", "I-DATE", "O", "O", "B-MISC", "I-MISC", "O", "O",
                         "B-PER", "I-PER", "O", "B-LOC"]
    mapped = read_conll(path, label_map=NER_TARGET_MAP)
    assert mapped[0][0] == raw[0][0]
    assert mapped[0][1] == ["O", "O", "O", "O", "O", "O", "O", "O", "O", "B-PER", "I-PER", "O", "B-LOC"]
    assert mapped[1] == (["Reuters"], ["B-ORG"])
    # A type can also be renamed; B-/I- prefixes are kept.
    renamed = read_conll(path, label_map={"PER": "PERSON", "MISC": "O"})
    assert renamed[0][1][9:11] == ["B-PERSON", "I-PERSON"] and renamed[0][1][1] == "B-DATE"
    assert map_entity_types(["B-MISC", "I-MISC", "B-LOC", "O"], NER_TARGET_MAP) == ["O", "O", "B-LOC", "O"]
    # Another column can be the label column (here the chunk tags), without IOB checks.
    chunks = read_conll(path, label_column=2, iob=False)
    assert chunks[0][1][:3] == ["B-PP", "B-NP", "I-NP"]
    with pytest.raises(ValueError, match="entity type"):
        read_conll(path, label_map={"B-MISC": "O"})


def test_conll_bom_and_invisible_characters(tmp_path):
    path = write(tmp_path, "zw.txt", "\ufeffJii O\n\u200bEthiopia B-LOC\n\u200b O\nna\u200e O\n\nx O\n")
    assert read_conll(path) == [(["Jii", "Ethiopia", "na"], ["O", "B-LOC", "O"]), (["x"], ["O"])]


def test_label_list_order():
    sentences = [(["a", "b", "c"], ["B-ZZZ", "I-PER", "O"]), (["d", "e"], ["B-AAA", "I-AAA"])]
    assert label_list(sentences) == ["O", "B-AAA", "I-AAA", "I-PER", "B-ZZZ"]
    assert label_list(sentences, ["O", "B-PER", "I-PER"]) == ["O", "B-PER", "I-PER", "B-AAA", "I-AAA", "B-ZZZ"]
    assert label_list(sentences[:1], ["O", "B-PER", "I-PER", "B-ZZZ"], strict=True) == ["O", "B-PER", "I-PER", "B-ZZZ"]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("EU NNP B-NP B-ORG\nrejects VBZ B-VP\n", 2, "3 columns; expected 4"),
        ("EU B-ORG\n\nrejects X-PER\n", 3, "'X-PER' is not an IOB2 tag"),
        ("EU B-ORG\nrejects B-\n", 2, "'B-' is not an IOB2 tag"),
        ("EU\n", 1, "1 column"),
    ],
)
def test_conll_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, "bad.conll", text)
    with pytest.raises(DataFormatError, match=message) as info:
        read_conll(path)
    assert f"{path}:{line}:" in str(info.value)
    assert isinstance(info.value, SftError) and isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------- CoNLL-U


def test_conllu_skips_multiword_tokens_and_empty_nodes():
    sentences = read_conllu(FIXTURES / "en_ewt-ud-dev.head.conllu")
    assert len(sentences) == 59
    assert sum(len(forms) for forms, _ in sentences) == 1404  # the integer-ID lines of the fixture
    # Sentence 7 has the multiword token "29-30 didn't": its words did + n't are kept, the range is not.
    forms, tags = sentences[6]
    assert forms[-4:] == ["they", "did", "n't", "."] and tags[-4:] == ["PRON", "AUX", "PART", "PUNCT"]
    assert "didn't" not in forms
    # Sentence 59 has the empty node "8.1 write" (a copy of word 5): it is skipped.
    forms, tags = sentences[58]
    assert forms[4:9] == ["write", "anything", "they", "like", "about"]
    assert forms.count("write") == 1
    assert all(len(forms) == len(tags) for forms, tags in sentences)


def test_conllu_keeps_spaces_in_forms(tmp_path):
    path = write(tmp_path, "space.conllu", "# text = 1 000\n1\t1 000\t1000\tNUM\t_\t_\t0\troot\t_\t_\n")
    assert read_conllu(path) == [(["1 000"], ["NUM"])]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("# c\n1\tHi\thi\tINTJ\t_\t_\t0\troot\t_\t_\nx\tthere\tthere\tADV\t_\t_\t1\tadvmod\t_\t_\n", 3, "ID 'x'"),
        ("1\tHi\thi\tINTJ\t_\t_\t0\troot\t_\n", 1, "9 tab-separated columns"),
        ("1 Hi hi INTJ _ _ 0 root _ _\n", 1, "1 tab-separated columns"),
    ],
)
def test_conllu_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, "bad.conllu", text)
    with pytest.raises(DataFormatError, match=message) as info:
        read_conllu(path)
    assert f"{path}:{line}:" in str(info.value)


# -------------------------------------------------------------------------------------------- NLI


def test_nli_without_header():
    pairs = read_nli_tsv(FIXTURES / "xnli-dev-en.head.tsv")
    assert len(pairs) == 40
    assert pairs[0] == ("And he said, Mama, I'm home.",
                        "He called his mom as soon as the school bus dropped him off.", "neutral")
    assert {label for _, _, label in pairs} == set(NLI_LABELS)


def test_nli_with_language_header_and_quotes():
    pairs = read_nli_tsv(FIXTURES / "americasnli-dev-quy.sample.tsv")
    assert len(pairs) == 20  # the header line is not a pair
    assert pairs[0] == ("Hinaptinmi pay nirqa: Mamay wasipim kachkani.",
                        "Mamanta qayamurqa iskuyla karru saqiykuchkaptin.", "neutral")
    quoted = pairs[-1]
    assert '"Christmas Carol" huñunakuypi' in quoted[0]  # quotes kept verbatim, no CSV unquoting
    assert quoted[1:] == ("Pachakunata makillawan rurarqaku", "neutral")


def test_nli_three_column_header_and_odd_quotes(tmp_path):
    path = write(tmp_path, "nli.tsv", 'premise\thypothesis\tlabel\nHe said "hi\tA "quote\tentailment\n\n')
    assert read_nli_tsv(path) == [('He said "hi', 'A "quote', "entailment")]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("language\tpremise\thypothesis\tlabel\nquy\tP\tH\tneutral\nquy\tP\tH\tmaybe\n", 3, "label 'maybe'"),
        ("P\tH\tneutral\nP\tH\n", 2, "2 tab-separated columns; expected 3"),
        ("P\tH\tneutral\nP, H, neutral\n", 2, "1 tab-separated columns"),
    ],
)
def test_nli_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, "bad.tsv", text)
    with pytest.raises(DataFormatError, match=message) as info:
        read_nli_tsv(path)
    assert f"{path}:{line}:" in str(info.value)


# ---------------------------------------------------------------------------------- tokenisation


def test_first_subtoken_alignment_minilm(minilm):
    sentence = (["Schoenefeld", "EU", "rejects"], ["B-LOC", "B-ORG", "O"])
    dataset = TokenClassificationDataset([sentence], minilm, NER_LABEL2ID, max_length=32)
    item = dataset[0]
    assert minilm.convert_ids_to_tokens(item["input_ids"]) == [
        "[CLS]", "sc", "##hoe", "##ne", "##feld", "eu", "rejects", "[SEP]"]
    b_loc, b_org, o = NER_LABEL2ID["B-LOC"], NER_LABEL2ID["B-ORG"], NER_LABEL2ID["O"]
    assert item["labels"] == [-100, b_loc, -100, -100, -100, b_org, o, -100]
    assert item["attention_mask"] == [1] * 8 and item["token_type_ids"] == [0] * 8
    assert dataset.word_ids(0) == [None, 0, 0, 0, 0, 1, 2, None]
    id2label = dict(enumerate(NER_DEFAULT_LABELS))
    predictions = [0, b_loc, 0, 0, 0, b_org, o, 0]
    assert dataset.word_predictions(0, predictions, id2label) == ["B-LOC", "B-ORG", "O"]


def test_truncation_minilm(minilm):
    sentence = (["Schoenefeld", "EU", "rejects"], ["B-LOC", "B-ORG", "O"])
    dataset = TokenClassificationDataset([sentence], minilm, NER_LABEL2ID, max_length=5)
    item = dataset[0]
    assert minilm.convert_ids_to_tokens(item["input_ids"]) == ["[CLS]", "sc", "##hoe", "##ne", "[SEP]"]
    assert item["labels"] == [-100, NER_LABEL2ID["B-LOC"], -100, -100, -100]
    # Words cut off by truncation get the fill label back.
    id2label = dict(enumerate(NER_DEFAULT_LABELS))
    assert dataset.word_predictions(0, [0, 5, 0, 0, 0, 0, 0], id2label) == ["B-LOC", "O", "O"]


def test_token_classification_collator_on_shipped_data(minilm):
    sentences = read_conll(shipped_data("ner/hau/dev.txt"), label_map=NER_TARGET_MAP)
    dataset = TokenClassificationDataset(sentences, minilm, NER_LABEL2ID, max_length=64)
    assert len(dataset) == 276
    for index in range(len(dataset)):
        item = dataset[index]
        assert len(item["input_ids"]) <= 64
        words, tags = dataset.sentences[index]
        labelled = [label for label in item["labels"] if label != -100]
        kept = {w for w in dataset.word_ids(index) if w is not None}
        assert labelled == [NER_LABEL2ID[tags[w]] for w in sorted(kept)]
        assert item["labels"][0] == -100 and item["labels"][-1] == -100
    batch = DataCollatorForTokenClassification(minilm)([dataset[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_token_classification_xlmr_like(xlmr_like):
    dataset = TokenClassificationDataset([(["Kano", "the", "cat"], ["B-LOC", "O", "O"])], xlmr_like, NER_LABEL2ID)
    item = dataset[0]
    assert xlmr_like.convert_ids_to_tokens(item["input_ids"]) == ["<s>", "▁Ka", "no", "▁the", "▁cat", "</s>"]
    assert item["labels"] == [-100, NER_LABEL2ID["B-LOC"], -100, 0, 0, -100]
    assert "token_type_ids" not in item


def test_token_classification_errors(minilm):
    with pytest.raises(DataFormatError, match="B-MISC"):
        TokenClassificationDataset([(["German"], ["B-MISC"])], minilm, NER_LABEL2ID)

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        TokenClassificationDataset([(["a"], ["O"])], SlowTokenizer(), NER_LABEL2ID)


def test_sentence_pair_dataset(minilm):
    pairs = read_nli_tsv(FIXTURES / "xnli-dev-en.head.tsv")
    dataset = SentencePairDataset(pairs, minilm, max_length=16)
    assert len(dataset) == 40
    item = dataset[0]
    assert item["labels"] == NLI_LABELS.index("neutral")
    assert len(item["input_ids"]) <= 16
    assert item["input_ids"][0] == minilm.cls_token_id and item["input_ids"].count(minilm.sep_token_id) == 2
    assert set(item["token_type_ids"]) == {0, 1}
    batch = DataCollatorWithPadding(minilm)([dataset[i] for i in range(3)])
    assert batch["labels"].tolist() == [NLI_LABELS.index(label) for _, _, label in pairs[:3]]
    assert batch["input_ids"].shape[0] == 3


# ------------------------------------------------------------------------------------------- MLM


def test_mlm_blocks(minilm):
    lines = read_text_lines(shipped_data("mlm/hau.txt"))[:200]
    dataset = MlmDataset(lines, minilm, max_length=32)
    assert dataset.n_special == 2
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert all(length == 32 for length in lengths[:-1]) and 2 < lengths[-1] <= 32
    for i in range(len(dataset)):
        ids = dataset[i]["input_ids"]
        assert ids[0] == minilm.cls_token_id and ids[-1] == minilm.sep_token_id
        assert dataset[i]["attention_mask"] == [1] * len(ids)
    # The blocks' contents are the token stream of the lines with [SEP] between lines.
    stream = []
    for index, ids in enumerate(minilm(lines, add_special_tokens=False)["input_ids"]):
        stream += ([minilm.sep_token_id] if index else []) + ids
    content = [t for i in range(len(dataset)) for t in dataset[i]["input_ids"][1:-1]]
    assert content == stream == content[: dataset.n_tokens]
    assert len(MlmDataset(lines, minilm, max_length=32, drop_last=True)) == len(stream) // 30


def test_mlm_collator_masks_dynamically(minilm):
    lines = read_text_lines(shipped_data("mlm/en.txt"))[:300]
    dataset = MlmDataset(lines, minilm, max_length=64)
    collator = DataCollatorForLanguageModeling(minilm, mlm_probability=0.15)
    items = [dataset[i] for i in range(len(dataset) - 1)]
    original = torch.tensor([item["input_ids"] for item in items])
    special = torch.tensor([item["special_tokens_mask"] for item in items]).bool()
    torch.manual_seed(0)
    batch = collator(items)
    labels = batch["labels"]
    assert "special_tokens_mask" not in batch
    assert (labels[special] == -100).all()  # [CLS], [SEP] and line separators are never targets
    chosen = labels != -100
    assert (labels[chosen] == original[chosen]).all()
    assert (batch["input_ids"][~chosen] == original[~chosen]).all()
    assert (batch["input_ids"][chosen] == minilm.mask_token_id).float().mean() > 0.6
    assert 0.10 < chosen.float().sum() / (~special).float().sum() < 0.20
    torch.manual_seed(1)
    assert not torch.equal(collator(items)["labels"], labels)  # masking is redone per batch


def test_mlm_xlmr_like_template(xlmr_like):
    dataset = MlmDataset(["Kano the cat", "the cat sat"], xlmr_like, max_length=6)
    blocks = [xlmr_like.convert_ids_to_tokens(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert blocks == [["<s>", "▁Ka", "no", "▁the", "▁cat", "</s>"],
                      ["<s>", "</s>", "▁the", "▁cat", "▁sat", "</s>"]]
    assert dataset[1]["special_tokens_mask"] == [1, 1, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="no room"):
        MlmDataset(["x"], xlmr_like, max_length=2)


def test_split_held_out_is_deterministic():
    lines = [f"line {i}" for i in range(100)]
    train, held = split_held_out(lines, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == sorted(lines) and not set(train) & set(held)
    assert train == [line for line in lines if line in set(train)]  # original order kept
    assert split_held_out(lines, 0.1, seed=3) == (train, held)
    assert split_held_out(lines, 0.1, seed=4) != (train, held)
    assert split_held_out(lines, 0.0) == (lines, [])
    assert split_held_out(["a", "b"], 0.01) in [(["a"], ["b"]), (["b"], ["a"])]
    assert split_held_out(["a"], 0.5) == (["a"], [])
    with pytest.raises(ValueError):
        split_held_out(lines, 1.0)


# ---------------------------------------------------------------------------------------- digests


def test_digests_and_descriptions(tmp_path):
    a = write(tmp_path, "a.txt", "one\ntwo\n")
    (tmp_path / "sub").mkdir()
    b = write(tmp_path, "sub/b.txt", "three")
    assert sha256_of_files(a) == hashlib.sha256(b"one\ntwo\n").hexdigest()
    both = sha256_of_files(a, b)
    assert both == sha256_of_files(str(a), str(b)) and both != sha256_of_files(b, a) and len(both) == 64
    records = describe_files([a, b])
    assert records[0] == {"name": "a.txt", "sha256": sha256_of_files(a), "size": 8, "lines": 2}
    assert records[1]["name"] == "b.txt" and records[1]["lines"] == 1 and records[1]["size"] == 5
    assert describe_files([b], root=tmp_path)[0]["name"] == "sub/b.txt"
    shipped = describe_files([shipped_data("ner/hau/test.txt")])[0]
    assert shipped["size"] == 131781 and shipped["lines"] == 17393
