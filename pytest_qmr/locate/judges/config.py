"""The judge config file: the LLM judges by name, the primary judge and the ensemble policy.

``{"judges": [ {name, ...}, ... ] | {NAME: {...}}, "primary": NAME, "policy": {...}}`` in YAML
(or JSON). Each judge is a :class:`JudgeConfig`: ``kind`` ``openai`` (any OpenAI-compatible
``/v1/chat/completions`` endpoint: a hosted API, vLLM, llama.cpp, ``qmr serve``; needs
``base_url``) or ``local`` (a transformers checkpoint in this process), ``model``,
``api_key_env`` (the NAME of an environment variable holding the key, read at call time),
``timeout``, ``max_retries``, ``concurrency`` and the request's settings. A name may not be a
registered judge's (:data:`pytest_qmr.registry.JUDGES`: ``rule``, ``arith``, ...). Every error
is one :class:`JudgeFileError` line, the key never in it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ...errors import QmrError
from ...registry import JUDGES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class JudgeConfig(BaseModel):
    """One LLM judge. ``api_key_env`` is the NAME of an environment variable, never the key."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["openai", "local"] = "openai"
    base_url: str | None = None  # "http://host:8000/v1" (or without /v1)
    model: str  # the model id sent to the endpoint; for kind=local a model reference
    api_key_env: str | None = None
    timeout: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=20)
    concurrency: int = Field(default=4, ge=1, le=256)
    temperature: float | None = Field(default=0.0, ge=0, le=2)  # None: not sent (models that refuse it)
    max_tokens: int = Field(default=1024, ge=1)
    token_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"  # the name the endpoint wants
    extra_body: dict[str, Any] = Field(default_factory=dict)  # e.g. {"response_format": {"type": "json_object"}}
    backoff: float = Field(default=1.0, ge=0)  # first retry delay, doubled each retry
    backoff_max: float = Field(default=30.0, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value) or value in JUDGES:
            raise ValueError(f"judge name must match {_NAME.pattern} and not be a registered judge's "
                             f"({', '.join(JUDGES.names())})")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        # The message never repeats the value: someone may have pasted the key itself here.
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("must be the NAME of an environment variable (letters, digits, _), not the key")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _needs_url(self) -> "JudgeConfig":
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai-kind judge needs base_url")
        clash = {"model", "messages", "stream", "n"} & set(self.extra_body)
        if clash:
            raise ValueError(f"extra_body may not set {', '.join(sorted(clash))}")
        return self

    @property
    def endpoint(self) -> str:
        base = self.base_url or ""
        return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class JudgeFileError(QmrError, ValueError):
    """A judge config file that cannot be used (one line, the key never in it)."""


def _config_errors(exc: ValidationError, where: str) -> str:
    # Only locations and messages: pydantic's input_value could be a pasted key.
    return "; ".join(f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


@dataclass
class JudgeSettings:
    judges: dict[str, JudgeConfig]
    primary: str | None = None
    policy: dict[str, Any] = field(default_factory=dict)


def parse_judge_settings(data: Any, source: str = "judge config") -> JudgeSettings:
    """``{"judges": [ {name, ...}, ... ] | {NAME: {...}}, "primary": NAME, "policy": {...}}``."""
    if not isinstance(data, dict):
        raise JudgeFileError(f"{source}: expected a mapping with a 'judges' key")
    unknown = set(data) - {"judges", "primary", "policy"}
    if unknown:
        raise JudgeFileError(f"{source}: unknown key {sorted(unknown)[0]!r} (known: judges, primary, policy)")
    entries = data.get("judges") or []
    if isinstance(entries, dict):
        entries = [{"name": name, **(spec or {})} for name, spec in entries.items()]
    if not isinstance(entries, list):
        raise JudgeFileError(f"{source}: 'judges' must be a list or a mapping")
    judges: dict[str, JudgeConfig] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise JudgeFileError(f"{source}: judges[{i}] must be a mapping")
        try:
            config = JudgeConfig.model_validate(entry)
        except ValidationError as exc:
            raise JudgeFileError(f"{source}: {_config_errors(exc, f'judges[{i}]')}") from None
        if config.name in judges:
            raise JudgeFileError(f"{source}: judge name {config.name!r} appears twice")
        judges[config.name] = config
    primary = data.get("primary")
    if primary is not None and primary not in judges:
        raise JudgeFileError(f"{source}: primary {primary!r} is not a configured judge")
    policy = data.get("policy") or {}
    if not isinstance(policy, dict):
        raise JudgeFileError(f"{source}: 'policy' must be a mapping")
    return JudgeSettings(judges, primary, policy)


def load_judge_settings(path: str | os.PathLike) -> JudgeSettings:
    """Read a YAML (or JSON) judge config file (see :func:`parse_judge_settings`)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JudgeFileError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise JudgeFileError(f"{path}: not UTF-8 text "
                             f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise JudgeFileError(f"{path}: not valid YAML{where}") from None
    return parse_judge_settings(data, str(path))
