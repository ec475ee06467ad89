"""The embedded server's config: the AMX work-around for llama.cpp's crash on multi-token batches."""

from pathlib import Path

import pytest

from finetune_kit.config import load_settings
from finetune_kit.llm import local_server


def test_amx_is_read_from_cpuinfo_flags(tmp_path: Path) -> None:
    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("flags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    plain.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert local_server.cpu_has_amx(amx) and not local_server.cpu_has_amx(plain)
    assert not local_server.cpu_has_amx(tmp_path / "missing")


@pytest.mark.parametrize("amx", [True, False])
def test_the_micro_batch_is_one_token_only_on_amx(
    amx: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_server, "cpu_has_amx", lambda: amx)
    config = local_server.server_config(load_settings(workspace=tmp_path / "ws"), tmp_path / "m.gguf")
    assert [m.get("n_ubatch") for m in config["models"]] == [1 if amx else None]
