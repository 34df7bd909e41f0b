import subprocess
import sys

import pytest

from flux_lora.errors import InputError
from flux_lora.lora.refs import Endpoints, parse_lora_ref
from flux_lora.models.layout import REPO_ROOT
from flux_lora.urls import redact, split_credentials

ENDPOINTS = Endpoints(replicate="http://r.test", huggingface="http://hf.test", civitai="http://c.test")


@pytest.mark.parametrize(
    ("text", "kind", "url", "identity"),
    [
        (
            "fofr/flux-pixar-cars",
            "replicate",
            "http://r.test/fofr/flux-pixar-cars/_weights",
            "replicate:fofr/flux-pixar-cars",
        ),
        (
            "fofr/flux-pixar-cars/abc123",
            "replicate",
            "http://r.test/fofr/flux-pixar-cars/versions/abc123/_weights",
            "replicate:fofr/flux-pixar-cars/versions/abc123",
        ),
        (
            "fofr/flux-pixar-cars/versions/abc123",
            "replicate",
            "http://r.test/fofr/flux-pixar-cars/versions/abc123/_weights",
            "replicate:fofr/flux-pixar-cars/versions/abc123",
        ),
        (
            "https://replicate.com/fofr/flux-pixar-cars",
            "replicate",
            "http://r.test/fofr/flux-pixar-cars/_weights",
            "replicate:fofr/flux-pixar-cars",
        ),
        (
            "huggingface.co/XLabs-AI/flux-RealismLora",
            "huggingface",
            "http://hf.test/api/models/XLabs-AI/flux-RealismLora/revision/main",
            "hf:XLabs-AI/flux-RealismLora@main",
        ),
        (
            "https://huggingface.co/a/b/resolve/v2/dir/l.safetensors",
            "huggingface",
            "http://hf.test/a/b/resolve/v2/dir/l.safetensors",
            "hf:a/b@v2/dir/l.safetensors",
        ),
        (
            "huggingface.co/a/b/blob/main/l.safetensors",
            "huggingface",
            "http://hf.test/a/b/resolve/main/l.safetensors",
            "hf:a/b@main/l.safetensors",
        ),
        (
            "civitai.com/models/123/some-name",
            "civitai",
            "http://c.test/api/v1/models/123",
            "civitai:model:123",
        ),
        (
            "https://civitai.com/models/123?modelVersionId=456",
            "civitai",
            "http://c.test/api/download/models/456?type=Model&format=SafeTensor",
            "civitai:version:456",
        ),
        (
            "https://civitai.com/api/download/models/456?type=Model",
            "civitai",
            "http://c.test/api/download/models/456?type=Model",
            "civitai:version:456",
        ),
        (
            "https://example.com/x/lora.safetensors?download=1",
            "url",
            "https://example.com/x/lora.safetensors?download=1",
            "url:https://example.com/x/lora.safetensors?download=1",
        ),
        (
            "https://replicate.delivery/pbxt/abc/trained_model.tar",
            "url",
            "https://replicate.delivery/pbxt/abc/trained_model.tar",
            "url:https://replicate.delivery/pbxt/abc/trained_model.tar",
        ),
    ],
)
def test_sources(text, kind, url, identity):
    ref = parse_lora_ref(text, "replicate_weights", ENDPOINTS)
    assert (ref.kind, ref.url, ref.identity) == (kind, url, identity)
    assert ref.is_tar == (kind == "replicate" or url.endswith(".tar"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("https://example.com/model.ckpt", "is a pickle file"),
        ("https://example.com/model.bin", "is a pickle file"),
        ("file:///etc/passwd", "the file: scheme is not supported"),
        ("ftp://example.com/l.safetensors", "the ftp: scheme is not supported"),
        ("/etc/passwd", "is a local path; request inputs never read files"),
        ("~/lora.safetensors", "is a local path"),
        ("just-a-word", "is not a LoRA reference"),
        ("https://example.com/page.html", "must end in .safetensors or .tar"),
        ("huggingface.co/only-owner", "names no repository"),
        ("civitai.com/images/5", "is not a CivitAI model link"),
        ("data:text/plain,hello", "must be base64"),
    ],
)
def test_refusals_name_the_input(text, message):
    with pytest.raises(InputError, match=r"^extra_lora: ") as caught:
        parse_lora_ref(text, "extra_lora", ENDPOINTS)
    assert message in str(caught.value)


def test_local_paths_only_for_cog_weights(tmp_path, monkeypatch):
    ref = parse_lora_ref("/models/lora.tar", "COG_WEIGHTS", ENDPOINTS, allow_local=True)
    assert ref.kind == "local" and ref.url == "/models/lora.tar"
    # "demo/x.safetensors" has the shape of a Replicate "owner/model": the existing file wins,
    # for COG_WEIGHTS only; a request input naming it is still a Replicate model.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "x.safetensors").write_bytes(b"")
    assert parse_lora_ref("demo/x.safetensors", "COG_WEIGHTS", ENDPOINTS, allow_local=True).kind == "local"
    assert parse_lora_ref("demo/x.safetensors", "extra_lora", ENDPOINTS).kind == "replicate"
    assert (
        parse_lora_ref("demo/absent.safetensors", "COG_WEIGHTS", ENDPOINTS, allow_local=True).kind
        == "replicate"
    )


def test_secrets_are_redacted_and_left_out_of_identities():
    text = "https://user:pw@example.com/l.safetensors?token=SECRET1&x-amz-signature=SECRET2&v=1"
    ref = parse_lora_ref(text, "replicate_weights", ENDPOINTS)
    assert "SECRET" not in ref.display and "pw" not in ref.display and "SECRET" not in ref.identity
    assert redact(text) == "https://***@example.com/l.safetensors?token=***&x-amz-signature=***&v=1"
    assert split_credentials(text)[0] == "https://example.com/l.safetensors?v=1"
    civitai = parse_lora_ref(
        "https://civitai.com/api/download/models/9?token=SECRET3", "extra_lora", ENDPOINTS
    )
    assert "SECRET3" in civitai.url and "SECRET3" not in civitai.display + civitai.identity


@pytest.mark.parametrize(
    "name", ["hf_token", "password", "private_token", "api_key", "X-Amz-Credential", "sessionid", "passwd"]
)
def test_every_credential_like_parameter_is_redacted_in_query_and_fragment(name: str):
    text = f"https://example.com/l.safetensors?v=1&{name}=SECRET5#{name}=SECRET6"
    assert redact(text) == f"https://example.com/l.safetensors?v=1&{name}=***#{name}=***"
    # Any text, not only URLs this container fetches: an ftp URL named as an image, say.
    assert redact(f"ftp://me:SECRET7@host/x.png?{name}=SECRET8") == f"ftp://***@host/x.png?{name}=***"


def test_a_reference_with_credentials_has_its_own_cache_scope():
    base = "https://example.com/l.safetensors?v=1"
    good, wrong, bare = (
        parse_lora_ref(url, "extra_lora", ENDPOINTS)
        for url in (f"{base}&token=GOOD", f"{base}&token=WRONG", base)
    )
    assert good.identity == wrong.identity == bare.identity  # the same weights, as named
    assert bare.scope is None and good.scope and wrong.scope and good.scope != wrong.scope
    userinfo = parse_lora_ref("https://u:p@example.com/l.safetensors?v=1", "extra_lora", ENDPOINTS)
    assert userinfo.scope not in (None, good.scope)
    civitai = [
        parse_lora_ref(f"https://civitai.com/api/download/models/9{q}", "extra_lora", ENDPOINTS).scope
        for q in ("", "?token=A", "?token=B")
    ]
    assert civitai[0] is None and None not in civitai[1:] and civitai[1] != civitai[2]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("https://[::1/l.safetensors", "not a valid URL"),
        ("https://example.com:99999/l.safetensors", "not a valid URL"),
        ("https://example.com/l\x00.safetensors", "a space or a control character"),
        ("https://example.com/my lora.safetensors", "a space or a control character"),
    ],
)
def test_a_malformed_url_is_an_input_error_naming_the_input(text: str, says: str):
    with pytest.raises(InputError, match=f"^extra_lora: .*{says}"):
        parse_lora_ref(text, "extra_lora", ENDPOINTS)


def test_endpoints_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLUX_LORA_REPLICATE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:8")
    monkeypatch.setenv("FLUX_LORA_CIVITAI_URL", "http://127.0.0.1:7")
    assert Endpoints.from_env() == Endpoints("http://127.0.0.1:9", "http://127.0.0.1:8", "http://127.0.0.1:7")


def test_resolve_lora_command_prints_the_source_without_secrets():
    command = [sys.executable, "-m", "flux_lora", "resolve-lora"]
    done = subprocess.run(
        [*command, "https://civitai.com/api/download/models/9?token=SECRET4"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    assert "kind: civitai" in done.stdout and "token=***" in done.stdout
    assert "SECRET4" not in done.stdout + done.stderr
    refused = subprocess.run([*command, "/etc/passwd"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert refused.returncode == 2 and "is a local path" in refused.stderr
