"""Base-model provisioning from the packaged GGUF: its metadata is parsed once per conversion."""

from __future__ import annotations


def test_a_gguf_file_is_parsed_once_per_conversion(monkeypatch):
    """transformers reads the file for the config, the tokenizer and the weights; inside `_gguf_read_once`
    the reads share one parsed reader, and the tensor-name map is built once; both are restored after."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from trlm.base_model import _gguf_read_once, packaged_gguf_path

    path = packaged_gguf_path()
    opened = []
    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda p, mode="r": opened.append(str(p)) or real(p, mode))
    with _gguf_read_once():
        first = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        second = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        maps = [gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) for _ in range(3)]
    assert opened == [str(path)] and first == second and maps[0] is maps[1] is maps[2]
    after = [gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) for _ in range(2)]
    assert after[0] is not after[1]  # restored: a new map per call again
    load_gguf_checkpoint(str(path), return_tensors=False)
    assert len(opened) == 2  # outside the block every read parses the file again
