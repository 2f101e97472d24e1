"""SettlingChatInterface: gr.ChatInterface plus one step after every reply, however it ended.

A reply can finish, fail or be stopped. After a stop the chat function gets no chance to write
anything (Gradio cancels it), yet the history must say "stopped", lose a refused image, and the
outputs the reply was updating must not keep a failed status. Gradio runs the `.then` steps of an
event also when Stop cancelled it, so this class attaches `after_reply(history) -> (history,
*additional outputs)` with `.then` to the reply events, then copies the result into the chat's state.
Gradio has no public handle on those events; ChatInterface hands them to `_setup_stop_events`
(gradio 6.31, pinned in constraints.txt), which is where this class takes them.
tests/e2e/test_browser.py (Stop, a refused image) fails if a Gradio upgrade changes this.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import gradio as gr

AfterReply = Callable[[Any], Awaitable[tuple[Any, ...]]]


class SettlingChatInterface(gr.ChatInterface):
    def __init__(self, fn: Callable[..., Any], *, after_reply: AfterReply, **kwargs: Any) -> None:
        self._after_reply = after_reply
        super().__init__(fn, **kwargs)

    def _setup_stop_events(self, event_triggers: list[Any], events_to_cancel: list[Any], after_success: Any) -> None:
        super()._setup_stop_events(
            event_triggers=event_triggers, events_to_cancel=events_to_cancel, after_success=after_success
        )
        quiet: dict[str, Any] = {"queue": False, "show_progress": "hidden", "api_visibility": "undocumented"}
        for event in events_to_cancel:
            event.then(
                self._after_reply, [self.chatbot], [self.chatbot, *self.additional_outputs], **quiet
            ).then(_same_twice, [self.chatbot], [self.chatbot_state, self.chatbot_value], **quiet)


def _same_twice(history: Any) -> tuple[Any, Any]:
    return history, history
