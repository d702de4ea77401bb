"""SGLang touch points, one module each (installed as ``kara_patches``).

Each module names the SGLang function it wraps and how, as ``PATCHES`` (see
:class:`kara_patches._patch.Patch`), and its hooks turn one SGLang event into one call into
:mod:`kara_sglang.adapter`.

``ALWAYS`` are applied in every process that loads the plugin (flags and start-up);
``RUNTIME`` only in scheduler processes whose server runs a policy other than ``none``, so
``--kv-policy none`` leaves SGLang's code paths as they were.
"""

from kara_patches import (
    admission,
    attention_capture,
    decode_positions,
    decode_retraction,
    decode_step,
    metrics,
    output_meta,
    recall_accounting,
    release,
    request_params,
    scheduler_init,
    server_args,
    server_info,
    session_turns,
    swa_eviction,
)

ALWAYS = server_args.PATCHES + scheduler_init.PATCHES + server_info.PATCHES
RUNTIME = (attention_capture.PATCHES + decode_positions.PATCHES + decode_step.PATCHES
           + release.PATCHES + admission.PATCHES + request_params.PATCHES
           + output_meta.PATCHES + metrics.PATCHES + decode_retraction.PATCHES
           + session_turns.PATCHES + recall_accounting.PATCHES + swa_eviction.PATCHES)
