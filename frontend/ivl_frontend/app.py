"""build_demo(): the page — a multimodal chat, its controls, the tile-grid preview and the banner."""

from __future__ import annotations

import gradio as gr
from ivl_proto.tiling_limits import MAX_TILES_LIMIT

from ivl_frontend.chat_examples import chat_examples
from ivl_frontend.chat_handler import NO_IMAGES_YET, ChatHandler
from ivl_frontend.chat_interface import SettlingChatInterface
from ivl_frontend.gateway_client import GatewayClient
from ivl_frontend.settings import FrontendSettings

CSS = """
#ivl-banner { border-left: 4px solid #f97316; padding: 0 12px; }
#ivl-tiles .caption-label { white-space: normal; }
"""

DESCRIPTION = (
    "Multimodal chat with [InternVL](https://arxiv.org/abs/2404.16821) (InternViT + dynamic 448px tiling + LLM), "
    "served by a gateway, a vision encoder and an LLM service. Attach one or more images, ask, and watch "
    "how each image is cut into tiles."
)


def build_demo(
    settings: FrontendSettings, gateway_client: GatewayClient, handler: ChatHandler | None = None
) -> gr.Blocks:
    """The page. Pass `handler` to close it (its preview files) when the page stops."""
    handler = handler if handler is not None else ChatHandler(settings, gateway_client)
    with gr.Blocks(title=settings.title, analytics_enabled=False, fill_height=True) as demo:
        gr.Markdown(f"## {settings.title}\n{DESCRIPTION}")
        banner = gr.Markdown("Connecting to the gateway…", elem_id="ivl-banner")
        with gr.Row(equal_height=False):
            left = gr.Column(scale=3)
            with left:
                chatbot = gr.Chatbot(
                    elem_id="ivl-chatbot", label="Chat", height=520, render=False, buttons=["copy"]
                )
                textbox = gr.MultimodalTextbox(
                    elem_id="ivl-input",
                    file_types=["image"],
                    file_count="multiple",
                    placeholder="Ask about your images… (attach several with the clip or drag them here)",
                    show_label=False,
                    submit_btn=True,
                    stop_btn=True,
                    render=False,
                )
            with gr.Column(scale=1, min_width=300):
                with gr.Accordion("Generation", open=True):
                    system_prompt = gr.Textbox(
                        value=settings.system_prompt, label="System prompt", lines=2,
                        placeholder="empty = the model's default",
                    )
                    temperature = gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05,
                                            label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="top_p")
                    max_new_tokens = gr.Slider(1, 2048, value=settings.max_new_tokens, step=1,
                                               label="Max new tokens", elem_id="ivl-max-new-tokens")
                with gr.Accordion("Image tiling", open=True):
                    max_tiles = gr.Slider(1, MAX_TILES_LIMIT, value=settings.max_tiles, step=1,
                                          label="Max tiles per image (448×448 each)", elem_id="ivl-max-tiles")
                    use_thumbnail = gr.Checkbox(value=settings.use_thumbnail,
                                                label="Add a thumbnail tile (whole image)")
                tiles = gr.Gallery(label="How the images are cut (448×448 tiles)", elem_id="ivl-tiles", columns=1,
                                   height=300, object_fit="contain", show_label=True, interactive=False)
                tiles_info = gr.Markdown(NO_IMAGES_YET, elem_id="ivl-tiles-info")
        with left:  # the chat goes in the left column, created after the controls it reads
            chat = SettlingChatInterface(
                handler.respond,
                after_reply=handler.after_reply,
                multimodal=True,
                chatbot=chatbot,
                textbox=textbox,
                additional_inputs=[system_prompt, temperature, top_p, max_new_tokens, max_tiles, use_thumbnail],
                additional_outputs=[tiles, tiles_info],
                concurrency_limit=settings.concurrency,
                api_name="chat",
                fill_height=False,
                examples=chat_examples(),
                cache_examples=False,
            )
        shown = gr.State("")
        controls, outputs = [textbox, max_tiles, use_thumbnail, shown], [tiles, tiles_info, shown]
        textbox.change(handler.plan_preview, controls, outputs, api_name="plan_preview", queue=False)
        max_tiles.release(handler.plan_preview, controls, outputs, api_visibility="undocumented", queue=False)
        use_thumbnail.input(handler.plan_preview, controls, outputs, api_visibility="undocumented", queue=False)
        demo.load(handler.banner, None, [banner], api_name="banner", queue=False)
        chatbot.clear(handler.clear_chat, None, [tiles, tiles_info], api_visibility="undocumented", queue=False)
        demo.unload(handler.forget_session)
        del chat
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue)
    return demo
