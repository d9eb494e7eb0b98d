"""The OpenAI-compatible endpoints, driven by the official ``openai`` client (a test extra).

Token-id prompts (the tiny model has no tokenizer): each choice carries
``token_ids`` as vLLM returns them, and they must equal ``/generate``'s and a
monolithic run's tokens; errors must arrive as OpenAI error objects that the
client raises as its own typed exceptions.
"""
from __future__ import annotations

from typing import Any

import pytest

from lamina_comm.model import SamplingParams
from lamina_comm.node.demo import post_json
from lamina_comm.node.model_node import ModelNode
from tests.node.test_disaggregated import greedy, prompt_of, reference_tokens

openai = pytest.importorskip("openai")

MODEL = "tiny"
TIMEOUT_S = 60.0


@pytest.fixture
def client(server: tuple[str, ModelNode]) -> Any:
    return openai.OpenAI(base_url=f"http://{server[0]}/v1", api_key="none", timeout=TIMEOUT_S, max_retries=0)


def token_ids(choice: Any) -> list[int]:
    return choice.model_extra["token_ids"] if hasattr(choice, "model_extra") else choice.token_ids


def test_the_model_is_listed(client: Any) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]


def test_completions_give_the_tokens_of_generate_and_of_a_monolithic_run(client: Any,
                                                                         server: tuple[str, ModelNode]) -> None:
    prompt = prompt_of(7, 3)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    expected = reference_tokens([prompt], [greedy(6)])[0]
    assert token_ids(answer.choices[0]) == expected and answer.choices[0].text == ""
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (7, 6, 13)
    status, body = post_json(server[0], "/generate", {"prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert status == 200 and body["tokens"] == expected


def test_several_prompts_and_n_choices(client: Any) -> None:
    prompts = [prompt_of(4, 1), prompt_of(9, 2)]
    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [choice.index for choice in answer.choices] == [0, 1, 2, 3]
    expected = reference_tokens(prompts, [greedy(5)] * 2)
    assert [token_ids(c) for c in answer.choices] == [expected[0], expected[0], expected[1], expected[1]]
    assert answer.usage.completion_tokens == 20 and answer.usage.prompt_tokens == 13


def test_seeded_sampling_matches_the_monolithic_model(client: Any) -> None:
    prompt = prompt_of(5, 4)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0.8, top_p=0.9,
                                       seed=11)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=7, seed=11)
    assert token_ids(answer.choices[0]) == reference_tokens([prompt], [params])[0]


def test_a_streamed_completion_gives_the_same_tokens_then_usage(client: Any) -> None:
    prompt = prompt_of(6, 5)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    tokens = [t for chunk in chunks for choice in chunk.choices for t in token_ids(choice)]
    assert tokens == reference_tokens([prompt], [greedy(8)])[0]
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_errors_arrive_as_openai_error_objects(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-9", prompt=[1, 2], max_tokens=2)
    assert missing.value.code == "model_not_found" and "gpt-9" in missing.value.message
    with pytest.raises(openai.BadRequestError) as text:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
    assert "tokenizer" in text.value.message and text.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as hot:
        client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=2, temperature=-1)
    assert "temperature" in hot.value.message and hot.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as many:
        client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=2, n=99)
    assert many.value.param == "n"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=4000)
    assert "positions" in long.value.message
    answer = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert len(token_ids(answer.choices[0])) == 2  # the server serves on


def monolithic_logprobs(prompt: list[int], steps: int, top: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """Greedy tokens with their log-probabilities and the top alternatives, from the monolithic model."""
    from lamina_comm.model import MonolithicModel, token_logprobs
    from tests.node.test_disaggregated import CONFIG, tiny_weights

    model = MonolithicModel(CONFIG, tiny_weights())
    model.add_request("r", len(prompt) + steps)
    out, entry = [], ("r", list(prompt), 0)
    for _ in range(steps):
        logits = model.step([entry])[0]
        token = int(logits.argmax())
        logprob, alternatives = token_logprobs(logits, token, top)
        out.append((token, logprob, alternatives))
        entry = ("r", [token], entry[2] + len(entry[1]))
    return out


def test_logprobs_are_the_monolithic_models_plain_and_streamed(client: Any) -> None:
    prompt = prompt_of(5, 6)
    expected = monolithic_logprobs(prompt, 4, 2)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == [f"token_id:{t}" for t, _, _ in expected]
    assert logprobs.token_logprobs == pytest.approx([lp for _, lp, _ in expected], abs=1e-6)
    for got, (_, _, alternatives) in zip(logprobs.top_logprobs, expected):
        assert list(got) == [f"token_id:{t}" for t, _ in alternatives]
        assert list(got.values()) == pytest.approx([v for _, v in alternatives], abs=1e-6)
    streamed = [choice.logprobs.token_logprobs[0]
                for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                                       logprobs=0, stream=True)
                for choice in chunk.choices if choice.logprobs]
    assert streamed == pytest.approx([lp for _, lp, _ in expected], abs=1e-6)
    with pytest.raises(openai.BadRequestError) as many:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, logprobs=21)
    assert many.value.param == "logprobs"


# ------------------------------------------------------------------ text: a checkpoint's tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant{% endif %}")


@pytest.fixture(scope="module")
def text_codec(tmp_path_factory: Any) -> Any:
    """A word-level tokenizer over the tiny vocabulary (w0 .. w249 and a few words), saved as a checkpoint's
    tokenizer.json and tokenizer_config.json, loaded back the way lamina-node loads it."""
    import json

    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from lamina_comm.node.text import TextCodec

    vocab = {f"w{i}": i for i in range(250)}
    vocab.update({"<unk>": 250, "<s>": 251, "system": 252, "user": 253, "assistant": 254})
    tokenizer = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    directory = tmp_path_factory.mktemp("checkpoint")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE,
                                                                 "bos_token": {"content": "<s>"}}))
    return TextCodec.from_dir(directory)


@pytest.fixture(scope="module")
def text_client(server: tuple[str, ModelNode], text_codec: Any) -> Any:
    """A second front door over the same model node, with the tokenizer."""
    from lamina_comm.node.http_api import FrontDoor

    front = FrontDoor(server[1], ("127.0.0.1", 0), request_timeout=TIMEOUT_S, model_name=MODEL, text=text_codec)
    front.start()
    host, port = front.address
    yield openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="none", timeout=TIMEOUT_S, max_retries=0)
    front.close()


def test_text_prompts_give_the_tokens_of_their_ids_and_text_answers(text_client: Any, text_codec: Any) -> None:
    words = "w7 w3 w19 w200 w42"
    ids = text_codec.encode(words)
    assert ids == [7, 3, 19, 200, 42]
    answer = text_client.completions.create(model=MODEL, prompt=words, max_tokens=6, temperature=0)
    expected = reference_tokens([ids], [greedy(6)])[0]
    choice = answer.choices[0]
    assert choice.text == text_codec.decode(expected) and choice.text.startswith("w")
    assert "token_ids" not in (choice.model_extra or {})  # with a tokenizer: only when asked for
    asked = text_client.completions.create(model=MODEL, prompt=words, max_tokens=6, temperature=0,
                                           extra_body={"return_token_ids": True})
    assert token_ids(asked.choices[0]) == expected and asked.choices[0].model_extra["prompt_token_ids"] == ids


def test_streamed_text_adds_up_to_the_answer(text_client: Any, text_codec: Any) -> None:
    words = ["w1 w2 w3", "w90 w91"]
    plain = text_client.completions.create(model=MODEL, prompt=words, max_tokens=5, temperature=0)
    parts = {0: "", 1: ""}
    for chunk in text_client.completions.create(model=MODEL, prompt=words, max_tokens=5, temperature=0,
                                                stream=True):
        for choice in chunk.choices:
            parts[choice.index] += choice.text
    assert [parts[0], parts[1]] == [c.text for c in plain.choices] and all(parts.values())


def test_chat_renders_the_template_and_answers_a_message(text_client: Any, text_codec: Any) -> None:
    messages = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w7 w8 w9"}]
    prompt = text_codec.encode(text_codec.render_chat(messages), add_special_tokens=False)
    assert prompt == [251, 252, 5, 6, 251, 253, 7, 8, 9, 251, 254]
    answer = text_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    expected = reference_tokens([prompt], [greedy(4)])[0]
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == text_codec.decode(expected)
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == 4
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in text_client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True) if chunk.choices)
    assert streamed == answer.choices[0].message.content


def test_chat_without_a_tokenizer_is_a_clear_400(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="chat needs a tokenizer"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_bad_chat_messages_are_refused_by_field(text_client: Any) -> None:
    for messages in ([], [{"role": "nobody", "content": "w1"}], [{"role": "user", "content": 5}]):
        with pytest.raises(openai.BadRequestError) as raised:
            text_client.chat.completions.create(model=MODEL, messages=messages)
        assert raised.value.body["param"] == "messages"


def test_stop_strings_cut_the_text_and_end_the_choice(text_client: Any, text_codec: Any) -> None:
    words = "w7 w3 w19 w200 w42"
    full = text_client.completions.create(model=MODEL, prompt=words, max_tokens=8, temperature=0,
                                          extra_body={"return_token_ids": True})
    tokens = token_ids(full.choices[0])
    stop = text_codec.decode(tokens[2:4])  # two generated words: "wA wB" (may occur earlier, too)
    answer = text_client.completions.create(model=MODEL, prompt=words, max_tokens=8, temperature=0, stop=[stop],
                                            extra_body={"return_token_ids": True})
    choice = answer.choices[0]
    expected_text = full.choices[0].text[:full.choices[0].text.index(stop)]
    assert choice.text == expected_text and choice.finish_reason == "stop"
    # Generation ended at the token whose text completed the stop string's first occurrence.
    ended = next(k for k in range(1, len(tokens) + 1) if stop in text_codec.decode(tokens[:k]))
    assert token_ids(choice) == tokens[:ended]
    streamed, reasons = "", []
    for chunk in text_client.completions.create(model=MODEL, prompt=words, max_tokens=8, temperature=0,
                                                stop=stop, stream=True):
        for c in chunk.choices:
            streamed += c.text
            reasons += [c.finish_reason] if c.finish_reason else []
    assert streamed == expected_text and reasons == ["stop"]


def test_stop_strings_without_a_tokenizer_are_a_400(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="stop strings need a tokenizer"):
        client.completions.create(model=MODEL, prompt=[1, 2], stop=["x"])
