"""The setup log holds coglet's lines and ours, and no line of a third-party library.

`/health-check` reports setup's log (`setup.logs`), one `[<target>] <message>` line per entry:
coglet's own lines under targets `coglet` and `coglet::<part>`, and everything the worker wrote to
stdout and stderr during setup under `coglet::setup`. A `coglet::setup` line is ours when it is
the message of a logging call in the serving code (`predict.py`, and `flux_lora/` but for the
development and test tools in `flux_lora/dev/` and `flux_lora/testing/`): its format string, with
each `%` conversion (or f-string field) standing for any text. Anything else there, a library's
warning above all, fails the test.
"""

from __future__ import annotations

import ast
import enum
import json
import logging
import re
from pathlib import Path

import pytest

from flux_lora import third_party_logs
from flux_lora.dev.cog_server import CogServer
from flux_lora.models.layout import REPO_ROOT

SERVING_SOURCES = [
    REPO_ROOT / "predict.py",
    *sorted(
        path
        for path in (REPO_ROOT / "flux_lora").rglob("*.py")
        if path.relative_to(REPO_ROOT / "flux_lora").parts[0] not in ("dev", "testing")
    ),
]
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
CONVERSION = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]")
LOG_LINE = re.compile(r"\[(coglet(?:::[\w:]+)?)\] (.*)")
WORKER_OUTPUT = "coglet::setup"
MIN_LITERAL = 4  # a format string with less fixed text than this would match about anything


def _printf_pattern(template: str) -> str:
    parts, end = [], 0
    for match in CONVERSION.finditer(template):
        parts += [re.escape(template[end : match.start()]), "%" if match.group() == "%%" else ".*"]
        end = match.end()
    return "".join([*parts, re.escape(template[end:])])


def _literal_text(node: ast.expr) -> str | None:
    """The format string a logging call passes (an f-string's fields as `%s`), or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value.replace("%", "%%") if isinstance(part, ast.Constant) else "%s" for part in node.values
        )
    return None


def our_message_patterns(sources: list[Path] = SERVING_SOURCES) -> list[re.Pattern[str]]:
    """One pattern per line of each literal format string our logging calls pass."""
    patterns = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and node.args
            ):
                continue
            template = _literal_text(node.args[0])
            for line in (template or "").splitlines():
                if len(re.sub(r"\W", "", CONVERSION.sub("", line))) >= MIN_LITERAL:
                    patterns.add(_printf_pattern(line))
    return [re.compile(pattern) for pattern in sorted(patterns)]


def classify(logs: str, patterns: list[re.Pattern[str]]) -> tuple[list[str], list[str]]:
    """(our lines, foreign lines) of a setup log; coglet's own lines are in neither."""
    ours, foreign = [], []
    for line in filter(str.strip, logs.splitlines()):
        framed = LOG_LINE.fullmatch(line)
        if framed and framed.group(1) != WORKER_OUTPUT:
            continue  # coglet itself
        if framed and any(pattern.fullmatch(framed.group(2)) for pattern in patterns):
            ours.append(line)
        else:
            foreign.append(line)
    return ours, foreign


def worker_setup_log(log_path: Path) -> str:
    """Everything the worker wrote during setup, framed as `/health-check` frames it, from the
    server's own log. coglet can mark setup complete before it has read the worker's last lines:
    seen once in nine full runs, "Setup done in" arrived after "Server ready", as
    `coglet::user`, and was missing from `setup.logs`. The server's log has every line."""
    lines = []
    for raw in log_path.read_text().splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        message = entry.get("fields", {}).get("message")
        if entry.get("target") in (WORKER_OUTPUT, "coglet::user") and message is not None:
            lines.append(f"[{WORKER_OUTPUT}] {message}")
            if message.startswith("Setup done in"):
                break
    return "\n".join(lines)


def test_the_setup_log_holds_no_third_party_line(server: CogServer) -> None:
    health = server.get("/health-check")
    assert "logs" in health["setup"], health
    patterns = our_message_patterns()
    ours, foreign = classify(worker_setup_log(server.log_path), patterns)
    assert any("Setup done in" in line for line in ours), ours
    foreign += classify(health["setup"]["logs"], patterns)[1]
    assert not foreign, "lines in the setup log that no logging call of ours writes:\n" + "\n".join(foreign)


def test_classify_tells_our_lines_from_the_rest() -> None:
    patterns = our_message_patterns()
    logs = "\n".join(
        [
            "[coglet] Server ready",
            "[coglet::worker_bridge] Running setup",
            "[coglet::setup]   FLUX.1-dev/vae: loaded in 0.02 s",
            "[coglet::setup] Setup done in 3.07 s",
            "[coglet::setup] Warning: Detected no triton, on systems without Triton certain kernels will not work",
            "W1204 20:05:26.851000 24385 torch/utils/_pytree.py:630] a line without coglet's frame",
        ]
    )
    ours, foreign = classify(logs, patterns)
    assert ours == [
        "[coglet::setup]   FLUX.1-dev/vae: loaded in 0.02 s",
        "[coglet::setup] Setup done in 3.07 s",
    ]
    assert foreign == logs.splitlines()[-2:]


def test_no_pattern_matches_anything() -> None:
    patterns = our_message_patterns()
    assert patterns
    assert not [pattern.pattern for pattern in patterns if pattern.fullmatch("an arbitrary library line")]


# The filters of flux_lora.third_party_logs: each drops its one line and passes the logger's others.


def record(logger: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(logger, logging.WARNING, __file__, 1, msg, args or None, None)


PYTREE_MESSAGE = (
    "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
    "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future release."
)


def test_the_pytree_deprecation_is_dropped_for_torchao_enums_only() -> None:
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    class Ours(enum.Enum):
        ONE = 1

    assert third_party_logs.known(record("torch.utils._pytree", PYTREE_MESSAGE, KernelPreference))
    assert not third_party_logs.known(record("torch.utils._pytree", PYTREE_MESSAGE, Ours))
    assert not third_party_logs.known(
        record("torch.utils._pytree", "%s is already registered", KernelPreference)
    )


def test_the_diffusers_safe_globals_line_is_dropped_while_torchao_lacks_the_classes() -> None:
    name = third_party_logs.DIFFUSERS_TORCHAO_LOGGER
    line = "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`"
    assert third_party_logs.known(record(name, line))  # torchao 0.18 has no torchao.dtypes.uintx
    assert not third_party_logs.known(record(name, "Some other torchao problem"))
    assert not third_party_logs.known(record("diffusers.other", line))


def test_the_missing_triton_line_is_dropped_with_a_cpu_only_torch_only() -> None:
    line = record(third_party_logs.TORCHAO_INTMM_LOGGER, third_party_logs.TORCHAO_NO_TRITON)
    assert third_party_logs.known(line) == third_party_logs.cpu_only_torch()
    assert not third_party_logs.known(record(third_party_logs.TORCHAO_INTMM_LOGGER, "another warning"))


def test_the_pil_fallback_line_is_dropped_for_the_processors_diffusers_imports_only() -> None:
    name = third_party_logs.TRANSFORMERS_IMPORT_LOGGER
    fallback = (
        "`{0}` requires torchvision (not installed); falling back to `{0}Pil` for backward compatibility. "
        "Install torchvision to use the default backend, or import `{0}Pil` directly to silence this warning."
    )
    if third_party_logs.torchvision_installed():
        pytest.skip("with torchvision installed transformers does not fall back")
    assert third_party_logs.known(record(name, fallback.format("CLIPImageProcessor")))
    assert third_party_logs.known(record(name, fallback.format("SiglipImageProcessor")))
    assert not third_party_logs.known(record(name, fallback.format("ViTImageProcessor")))


def test_install_is_idempotent_and_leaves_other_lines_alone(caplog: pytest.LogCaptureFixture) -> None:
    third_party_logs.install()
    third_party_logs.install()
    logger = logging.getLogger(third_party_logs.TORCHAO_INTMM_LOGGER)
    assert len([f for f in logger.filters if isinstance(f, third_party_logs._DropKnownLines)]) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("a torchao line we know nothing about")
    assert [r.getMessage() for r in caplog.records] == ["a torchao line we know nothing about"]
