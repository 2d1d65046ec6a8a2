"""Chat template rendering and label masking at exact token positions."""

from fineray.train.data import Example
from fineray.train.templates import IGNORE_INDEX, prompt_text, render_chat, tokenize_example

MSGS = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo"}]


def test_render_chatml_and_assistant_span(tiny_tok):
    text, spans = render_chat(tiny_tok, MSGS)
    assert text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    (s, e), = spans
    assert text[s:e] == "yo<|im_end|>"


def test_labels_cover_exactly_the_response_tokens(tiny_tok):
    prefix = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    n_prefix = len(tiny_tok(prefix, add_special_tokens=False)["input_ids"])
    response = tiny_tok("yo<|im_end|>", add_special_tokens=False)["input_ids"]
    tk = tokenize_example(tiny_tok, Example(messages=MSGS))
    assert tk.labels[:n_prefix] == [IGNORE_INDEX] * n_prefix
    assert tk.labels[n_prefix:n_prefix + len(response)] == response
    assert tk.labels[n_prefix + len(response):] == [IGNORE_INDEX] * (len(tk) - n_prefix - len(response))
    assert tk.input_ids[n_prefix:n_prefix + len(response)] == response


def test_multi_turn_masks_every_assistant_turn_only(tiny_tok):
    msgs = MSGS + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    tk = tokenize_example(tiny_tok, Example(messages=msgs))
    target_text = tiny_tok.decode([t for t in tk.labels if t != IGNORE_INDEX])
    assert target_text == "yo<|im_end|>ok<|im_end|>"


def test_train_on_prompt_and_raw_text(tiny_tok):
    tk = tokenize_example(tiny_tok, Example(messages=MSGS), train_on_prompt=True)
    assert tk.labels == tk.input_ids
    raw = tokenize_example(tiny_tok, Example(text="hello"))
    assert raw.input_ids[-1] == tiny_tok.eos_token_id and raw.labels == raw.input_ids


def test_prompt_text_ends_with_generation_header(tiny_tok):
    assert prompt_text(tiny_tok, MSGS).endswith("<|im_start|>assistant\n")


def test_fallback_template_when_tokenizer_has_none(tiny_dir, tmp_path):
    import shutil

    from fineray.train.config import ModelConfig
    from fineray.train.model import load_tokenizer

    d = tmp_path / "notemplate"
    shutil.copytree(tiny_dir, d)
    cfg_file = d / "tokenizer_config.json"
    import json

    tc = json.loads(cfg_file.read_text())
    tc.pop("chat_template", None)
    cfg_file.write_text(json.dumps(tc))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tok = load_tokenizer(ModelConfig(base=str(d)), str(d))
    text, spans = render_chat(tok, MSGS)
    assert text.startswith("### User:\nhi there") and text[spans[0][0]:].startswith("yo")
