"""The committed demo model (models/tiny-internvl-demo, trained by ivl_train) answers through the real stack
(redis-server, vision and LLM services, gateway; the `openai` client) what it was trained to answer, and the
split stack gives the very answers transformers' all-in-one model gives for the same images."""

from __future__ import annotations

import base64
from pathlib import Path

import grpc
import pytest
from ivl_frontend.chat_examples import EXAMPLES, EXAMPLES_DIR
from ivl_frontend.chat_handler import DEMO_BANNER
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_stack.tiny_model import TRAINED_DEMO_MODEL
from ivl_train.evaluate import AllInOne, EvalItem, heldout_set, normalise
from ivl_train.examples import EXAMPLES as TRAIN_EXAMPLES
from support.browser_page import ARTIFACTS, BOT, UI, attach, chromium, open_page, replies_done
from support.browser_page import ask as ask_in_page
from support.stack import running_stack
from support.waiting import wait_until

pytestmark = pytest.mark.slow

# What the UI's example pictures show (drawn by `python -m ivl_train examples`).
EXAMPLE_ANSWERS = {example.file_name: example.answer for example in TRAIN_EXAMPLES}


@pytest.fixture(scope="module")
def stack():
    assert (TRAINED_DEMO_MODEL / "config.json").is_file(), f"the demo model is missing at {TRAINED_DEMO_MODEL}"
    with running_stack(TRAINED_DEMO_MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack.http_url + "/v1", api_key="none", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def reference():
    return AllInOne(TRAINED_DEMO_MODEL)


def ask(client, item: EvalItem) -> str:
    url = "data:image/png;base64," + base64.b64encode(item.png).decode()
    reply = client.chat.completions.create(
        model=TRAINED_DEMO_MODEL.name, temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": item.question}]}],
        extra_body={"max_tiles": item.max_tiles} if item.max_tiles else None,
    )
    assert reply.choices[0].finish_reason == "stop"  # it ends its turn by itself
    return reply.choices[0].message.content


def example_items() -> list[EvalItem]:
    items = []
    for name, question in EXAMPLES:
        data = Path(EXAMPLES_DIR / name).read_bytes()
        items.append(EvalItem(name, 0, data, question, EXAMPLE_ANSWERS[name], 12))
    return items


def test_the_gateway_says_it_serves_the_demo_model(stack):
    with grpc.insecure_channel(stack.grpc_address) as channel:
        info = gateway_pb2_grpc.ChatStub(channel).Info(gateway_pb2.InfoRequest(), timeout=30)
    assert info.demo_model and not info.tiny_random_model
    assert info.model_id == TRAINED_DEMO_MODEL.name


@pytest.mark.parametrize("item", example_items(), ids=lambda item: item.kind)
def test_the_ui_examples_are_read_through_the_stack_and_equal_all_in_one(client, reference, item):
    served = ask(client, item)
    assert normalise(served) == normalise(item.answer)
    assert served == reference.answer(item)[0]


def test_held_out_images_split_stack_equals_all_in_one(client, reference):
    """A small fixed held-out set (every kind, small text at 1 and 12 tiles): the same answer, character for
    character, through the split stack and the all-in-one model; the colours (what the committed model was
    trained to answer, docs/demo_model.md) right."""
    items = heldout_set(seed=99, per_kind=3, small_max_tiles=(1, 12))
    served = [ask(client, item) for item in items]
    expected = [reference.answer(item)[0] for item in items]
    assert served == expected
    colours = [(normalise(s), i.answer) for s, i in zip(served, items, strict=True) if i.kind == "color"]
    assert sum(got == want for got, want in colours) >= 2, colours


def test_the_browser_shows_the_demo_models_answer(stack, reference):
    """The UI in a real Chromium, in front of the demo model: its banner, and the answer to the colour
    example, as a person sees it (artifacts/ui-demo-model.png)."""
    name, question = EXAMPLES[0]
    item = next(i for i in example_items() if i.kind == name)
    page_ui = UI(stack, max_new_tokens=24)
    try:
        with chromium() as browser:
            page = open_page(browser, page_ui.url)
            assert DEMO_BANNER.split("**")[1] in page.inner_text("#ivl-banner")
            attach(page, EXAMPLES_DIR / name)
            ask_in_page(page, question)
            wait_until(lambda: replies_done(page) >= 1, 120, "the demo model's reply")
            shown = page.locator(BOT).first.inner_text().strip()
            page.screenshot(path=str(ARTIFACTS / "ui-demo-model.png"), full_page=True)
    finally:
        page_ui.close()
    assert shown == reference.answer(item)[0]
    assert normalise(shown) == EXAMPLE_ANSWERS[name]
