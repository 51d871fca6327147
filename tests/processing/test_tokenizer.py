"""The LLaMA-2 tokenizer: official ids for every recorded prompt (both ``legacy`` modes, both backends), the special
token and BOS rules of ``tokenizer_image_token``, decoding, config handling and errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm

from owl2.model.inputs import OFFICIAL_IMAGE_TOKEN
from owl2.processing.tokenizer import IMAGE_TOKEN_INDEX, Owl2Tokenizer, load_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOKENIZER_DIR = FIXTURES / "llama2-tokenizer"
PROMPTS: list[dict[str, Any]] = json.loads((FIXTURES / "prompts" / "prompts_visible.json").read_text("utf-8"))
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "prompts" / "prompts_visible_manifest.json").read_text("utf-8"))
BACKENDS = ("sentencepiece", "tokenizers")
SP = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))


@pytest.fixture(scope="module", params=[(b, legacy) for b in BACKENDS for legacy in (True, False)],
                ids=lambda p: f"{p[0]}-legacy_{p[1]}")
def any_tokenizer(request: pytest.FixtureRequest) -> Owl2Tokenizer:
    backend, legacy = request.param
    return load_tokenizer(TOKENIZER_DIR, backend=backend, legacy=legacy)


@pytest.fixture(scope="module", params=BACKENDS)
def tokenizer(request: pytest.FixtureRequest) -> Owl2Tokenizer:
    """Each backend with the directory's own config (legacy true)."""
    return load_tokenizer(TOKENIZER_DIR, backend=request.param)


@pytest.fixture(scope="module", params=BACKENDS)
def tokenizer_nonlegacy(request: pytest.FixtureRequest) -> Owl2Tokenizer:
    return load_tokenizer(TOKENIZER_DIR, backend=request.param, legacy=False)


def make_checkpoint(tmp_path: Path, config: dict[str, Any] | None = None, special_map: dict[str, Any] | None = None,
                    files: tuple[str, ...] = ("tokenizer.model", "tokenizer.json")) -> Path:
    """A directory with the fixture's tokenizer files and the given config files (None: leave the file out)."""
    directory = tmp_path / "ckpt"
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copy(TOKENIZER_DIR / name, directory / name)
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (directory / "special_tokens_map.json").write_text(json.dumps(special_map))
    return directory


# -------------------------------------------------------------------------------------------------- fixture prompts
def test_fixture_set_is_complete() -> None:
    assert len(PROMPTS) == MANIFEST["n_cases"] == 15
    assert MANIFEST["image_token_index"] == IMAGE_TOKEN_INDEX == OFFICIAL_IMAGE_TOKEN
    differ = [c["name"] for c in PROMPTS if c["input_ids"] != c["input_ids_legacy_false"]]
    assert differ == MANIFEST["differ_with_legacy_false"]


@pytest.mark.parametrize("case", PROMPTS, ids=lambda c: c["name"])
def test_encode_prompt_matches_official_ids(any_tokenizer: Owl2Tokenizer, case: dict[str, Any]) -> None:
    expected = case["input_ids"] if any_tokenizer.legacy else case["input_ids_legacy_false"]
    assert any_tokenizer.encode_prompt(case["prompt"]) == expected


@pytest.mark.parametrize("case", PROMPTS, ids=lambda c: c["name"])
def test_pieces_and_decoding_match_official(tokenizer: Owl2Tokenizer, case: dict[str, Any]) -> None:
    ids = case["input_ids"]
    assert tokenizer.token_pieces(ids) == case["pieces"]
    text_ids = [i for i in ids if i != IMAGE_TOKEN_INDEX]
    assert tokenizer.decode(text_ids, skip_special_tokens=False) == case["decoded"]
    assert tokenizer.decode(text_ids) == case["decoded_skip_special"]
    assert tokenizer.decode(ids) == case["decoded_skip_special"]  # -200 is ignored


def test_config_of_fixture_directory(tokenizer: Owl2Tokenizer) -> None:
    recorded = MANIFEST["tokenizer"]
    assert tokenizer.legacy is recorded["legacy"] is True
    assert tokenizer.add_bos_token is recorded["add_bos_token"]
    assert tokenizer.add_eos_token is recorded["add_eos_token"]
    assert tokenizer.vocab_size == recorded["vocab_size"] == 32000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert recorded["pad_token_id"] is None and tokenizer.pad_token_id == 0  # the official trainer's pad = unk
    assert tokenizer.special_token_ids == {0, 1, 2}
    assert tokenizer.backend in BACKENDS


def test_auto_backend_prefers_sentencepiece(tmp_path: Path) -> None:
    assert load_tokenizer(TOKENIZER_DIR).backend == "sentencepiece"
    only_json = make_checkpoint(tmp_path, files=("tokenizer.json",))
    assert load_tokenizer(only_json).backend == "tokenizers"
    assert load_tokenizer(TOKENIZER_DIR / "tokenizer.json").backend == "tokenizers"
    assert load_tokenizer(TOKENIZER_DIR / "tokenizer.model").backend == "sentencepiece"


# -------------------------------------------------------------------------------------------------- encoding rules
def test_plain_encode(tokenizer: Owl2Tokenizer) -> None:
    assert tokenizer.encode("Hello world!") == [1, 15043, 3186, 29991]
    assert tokenizer.encode("Hello world!", add_bos=False) == [15043, 3186, 29991]
    assert tokenizer.encode("Hello", add_eos=True) == [1, 15043, 2]
    assert tokenizer.encode("") == [1]
    assert tokenizer.encode(" yes", add_bos=False) == [29871, 4874]
    # <|image|> is ordinary text for encode(); only encode_prompt treats it as an image
    assert IMAGE_TOKEN_INDEX not in tokenizer.encode("<|image|>")


def test_backends_agree_with_sentencepiece_on_random_text() -> None:
    rng = random.Random(0)
    alphabet = [*"abcdefXYZ0189 .,!?'\"\n\t-_:;()[]{}<>/|\\", *"éçß中文字한국😀▁\u3000\u00a0\u200b"]
    noise = ["</s>", "<s>", "<unk>", " </s> ", "\n<s>\n"]
    tokenizers = [load_tokenizer(TOKENIZER_DIR, backend=b, legacy=legacy) for b in BACKENDS for legacy in (True, False)]
    for _ in range(1500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        if rng.random() < 0.4:
            text = text.replace("<", rng.choice(noise), 1)
        sp_legacy, sp_new, tk_legacy, tk_new = (t.encode(text) for t in tokenizers)
        assert sp_legacy == tk_legacy and sp_new == tk_new, text
        if not any(s in text for s in ("<s>", "</s>", "<unk>")):
            assert sp_legacy == [1, *SP.encode(text)], text  # no special token: plain SentencePiece
            assert sp_new == sp_legacy, text  # legacy only matters after a special token


def test_special_tokens_in_text_are_split_out_with_whitespace(tokenizer: Owl2Tokenizer) -> None:
    # special_tokens_map.json names them as plain strings: whitespace on both sides is removed (transformers 4.31)
    assert tokenizer.tokenize("Hi </s> there") == ["▁Hi", "</s>", "▁there"]
    assert tokenizer.tokenize("a<s>b<unk>c") == ["▁a", "<s>", "▁b", "<unk>", "▁c"]
    assert tokenizer.encode("</s>\n\nUSER:", add_bos=False) == [2, 3148, 1001, 29901]
    assert tokenizer.encode("  </s>  ", add_bos=False) == [2]


def test_legacy_false_cuts_the_prefix_after_special_tokens(tokenizer_nonlegacy: Owl2Tokenizer) -> None:
    tok = tokenizer_nonlegacy
    assert tok.tokenize("Hi </s> there") == ["▁Hi", "</s>", "there"]
    assert tok.encode("a.</s>USER:", add_bos=False) == [263, 29889, 2, 3308, 1001, 29901]
    # the first segment keeps its prefix, even after whitespace stripping
    assert tok.encode("Hello") == [1, 15043]
    assert tok.encode("</s>hi", add_bos=False) == [2, 2918]
    # a piece that was only "▁" disappears ("请" is "▁", "请" when it starts a segment)
    assert tok.tokenize("x</s>请") == ["▁x", "</s>", "请"]
    # the cut piece is looked up as is: "would" is not a piece, so it becomes <unk> (transformers 4.31 does this)
    assert tok.encode("a</s>would", add_bos=False) == [263, 2, 0]


def test_legacy_true_gives_every_segment_its_prefix(tokenizer: Owl2Tokenizer) -> None:
    assert tokenizer.encode("a</s>would", add_bos=False) == [263, 2, 723]
    assert tokenizer.encode("a.</s>USER:", add_bos=False) == [263, 29889, 2, 3148, 1001, 29901]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<|image|>", [-200]),
        ("", []),
        ("Hi<|image|>", [1, 6324, -200]),
        ("Hi<|image|><|image|>", [1, 6324, -200, -200]),
        ("Hi<|image|>Hi", [1, 6324, -200, 6324]),  # the second chunk's BOS is dropped
        ("<|image|>Hi", [-200, 1, 6324]),  # starts with an image: no leading BOS, the chunk keeps its BOS
        ("<|image|>Hi<|image|>Hi", [-200, 1, 6324, -200, 1, 6324]),  # ... and so does every later chunk
        ("<|image|><|image|>Hi", [-200, -200, 1, 6324]),
        ("Hi <|image|>", [1, 6324, 29871, -200]),  # each chunk is tokenised on its own
        ("Hi<|image|> ", [1, 6324, -200, 259]),  # " " is "▁▁" (dummy prefix + the space)
    ],
)
def test_encode_prompt_bos_and_image_rules(any_tokenizer: Owl2Tokenizer, prompt: str, expected: list[int]) -> None:
    assert any_tokenizer.encode_prompt(prompt) == expected


def test_encode_prompt_without_bos(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path, config={"add_bos_token": False})
    tok = load_tokenizer(directory)
    assert tok.encode_prompt("Hi<|image|>Hi") == [6324, -200, 6324]
    assert tok.encode_prompt("<|image|>Hi") == [-200, 6324]


# -------------------------------------------------------------------------------------------------- decoding
def test_decode_ignores_image_ids_and_checks_the_rest(tokenizer: Owl2Tokenizer) -> None:
    ids = [1, 15043, -200, 32000, 40000, 3186, 2]
    assert tokenizer.decode(ids) == "Hello world"
    # transformers 4.31 puts a space before the text that precedes a special token (after "<s>" here)
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s> Hello world</s>"
    assert tokenizer.decode([]) == tokenizer.decode([1, 2]) == tokenizer.decode([-200]) == ""
    assert tokenizer.token_pieces([1, -200, 32000, 15043]) == ["<s>", "<|image|>", "<|image|>", "▁Hello"]
    with pytest.raises(ValueError, match="invalid token id -100"):
        tokenizer.decode([15043, -100])


def test_decode_round_trips_and_accepts_any_int_iterable(tokenizer: Owl2Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    text = "Is this café open? 😀👍 请描述这张图片。\n  Two  spaces."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(torch.tensor(ids)) == text


def test_decode_matches_sentencepiece_on_random_ids(tokenizer: Owl2Tokenizer) -> None:
    """Byte pieces, lone "▁" pieces and invalid UTF-8 decode exactly as SentencePiece decodes them."""
    rng = random.Random(1)
    byte_ids = list(range(3, 259))
    for _ in range(3000):
        ids = []
        for _ in range(rng.randint(0, 8)):
            r = rng.random()
            ids.append(rng.choice(byte_ids) if r < 0.4 else rng.choice([29871, 259, 1678, 35]) if r < 0.5
                       else rng.randrange(3, 32000))
        assert tokenizer.decode(ids) == SP.decode(ids), ids
    for invalid in (b"\xed\xa0\x80", b"\xc0\x80", b"\xf0\x9f\x98", b"\xc3"):  # surrogate, overlong, truncated
        ids = [SP.piece_to_id(f"<0x{b:02X}>") for b in invalid]
        assert tokenizer.decode(ids) == SP.decode(ids) == "\ufffd" * len(invalid)


def test_decode_streams_prefixes(tokenizer: Owl2Tokenizer) -> None:
    """A prefix ending inside a multi-byte character shows U+FFFD, which the streaming decoder holds back."""
    ids = tokenizer.encode("ok 😀", add_bos=False)
    assert [tokenizer.decode(ids[:n]) for n in range(1, len(ids) + 1)][-3:] == [
        "ok \ufffd\ufffd", "ok \ufffd\ufffd\ufffd", "ok 😀"]


# -------------------------------------------------------------------------------------------------- config files
def test_legacy_flag_is_read_from_config(tmp_path: Path) -> None:
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    directory = make_checkpoint(tmp_path, config={**config, "legacy": False},
                                special_map=json.loads((TOKENIZER_DIR / "special_tokens_map.json").read_text()))
    for backend in BACKENDS:
        tok = load_tokenizer(directory, backend=backend)
        assert tok.legacy is False
        case = next(c for c in PROMPTS if c["name"] == "multi_turn_image_first")
        assert tok.encode_prompt(case["prompt"]) == case["input_ids_legacy_false"]
        forced = load_tokenizer(directory, backend=backend, legacy=True)
        assert forced.encode_prompt(case["prompt"]) == case["input_ids"]


def test_defaults_without_config_files(tmp_path: Path) -> None:
    tok = load_tokenizer(make_checkpoint(tmp_path))
    assert tok.legacy is True and tok.add_bos_token is True and tok.add_eos_token is False
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)
    # tokens that only the defaults name are non-stripping AddedTokens in transformers 4.31
    assert tok.tokenize("Hi </s> there") == ["▁Hi", "▁", "</s>", "▁", "▁there"]


def test_special_token_stripping_flags(tmp_path: Path) -> None:
    added = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": True, "normalized": True,
             "single_word": False}
    directory = make_checkpoint(tmp_path, special_map={"bos_token": "<s>", "eos_token": added, "unk_token": "<unk>"})
    assert load_tokenizer(directory).tokenize("Hi </s> there") == ["▁Hi", "▁", "</s>", "▁there"]
    directory = make_checkpoint(tmp_path / "other", config={"eos_token": "</s>"})  # config only: no stripping
    assert load_tokenizer(directory).tokenize("Hi </s> there") == ["▁Hi", "▁", "</s>", "▁", "▁there"]


def test_pad_token_and_clean_up_from_config(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path, config={"pad_token": "</s>", "clean_up_tokenization_spaces": True,
                                                  "add_eos_token": True})
    tok = load_tokenizer(directory)
    assert tok.pad_token_id == 2
    assert tok.encode_prompt("Hi<|image|>Hi") == [1, 6324, 2, -200, 6324, 2]  # every chunk gets its EOS
    assert tok.decode(tok.encode("Hi , there .")) == "Hi, there."


def test_special_token_outside_vocabulary_is_rejected(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path, config={"pad_token": "<pad>"})
    with pytest.raises(ValueError, match=r"special token '<pad>' is not in the vocabulary"):
        load_tokenizer(directory)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer_config.json", "{not json", "not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", "expected a JSON object"),
        ("tokenizer_config.json", '{"legacy": "no"}', "'legacy' must be true or false"),
        ("special_tokens_map.json", '{"eos_token": 5}', "a special token must be a string"),
    ],
)
def test_malformed_config_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    directory = make_checkpoint(tmp_path)
    (directory / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_tokenizer(directory)


# -------------------------------------------------------------------------------------------------- errors
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no tokenizer directory or file at .*nowhere.*tokenizer\.model"):
        load_tokenizer(tmp_path / "nowhere")


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"looked for tokenizer\.model \(SentencePiece\) and tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_forced_backend_needs_its_file(tmp_path: Path) -> None:
    only_json = make_checkpoint(tmp_path, files=("tokenizer.json",))
    with pytest.raises(FileNotFoundError, match=r"backend 'sentencepiece' needs .*tokenizer\.model"):
        load_tokenizer(only_json, backend="sentencepiece")
    with pytest.raises(ValueError, match="backend must be"):
        load_tokenizer(only_json, backend="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs a tokenizer\.json file"):
        load_tokenizer(TOKENIZER_DIR / "tokenizer.model", backend="tokenizers")


def test_corrupt_model_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers file"):
        load_tokenizer(tmp_path)
