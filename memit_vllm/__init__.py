"""memit-vllm: mass-edit facts with MEMIT, ship them as patch files, merge them in vLLM at load time."""

__version__ = "0.1.0"


def make_patch(model, requests, **kwargs):
    """Compute a MEMIT patch (see memit_vllm.editor.make_patch); imported lazily to keep CLI start fast."""
    from .editor import make_patch as _make_patch

    return _make_patch(model, requests, **kwargs)


def load_patch(path, verify_content: bool = False):
    """Open a patch file (see memit_vllm.patch.load_patch)."""
    from .patch import load_patch as _load_patch

    return _load_patch(path, verify_content=verify_content)
