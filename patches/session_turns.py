"""Session turns: a continued streaming session builds its next prompt in KV space.

Wraps ``sglang.srt.session.session_controller.Session.create_req`` (AROUND), where SGLang
appends a turn's new tokens to the session's conversation. If the session's row holds a
compressed conversation (its last turn set ``kara_session_continue``), the new request's
prompt is rebuilt from that conversation's KV-space ids (``KaraRuntime.on_session_turn``).
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _create_req(original, session, req, *args, **kwargs):
    new_req = original(session, req, *args, **kwargs)
    runtime = adapter.current()
    if runtime is not None:
        runtime.on_session_turn(session, new_req, req.input_ids)  # req.input_ids: the new tokens only
    return new_req


PATCHES = (Patch("sglang.srt.session.session_controller.Session.create_req", "AROUND", _create_req),)
