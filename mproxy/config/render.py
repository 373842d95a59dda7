"""Rendering: the effective configuration as TOML, and the configuration reference.

Both are derived from the declarations (:data:`~mproxy.config.schema.SECTIONS`,
:data:`~mproxy.config.schema.OPTIONS`): there is no second list of keys.

Stdlib only.
"""

from __future__ import annotations

import dataclasses

from mproxy.config.kinds import _toml_value
from mproxy.config.schema import OPTIONS, SECTIONS, Config


def render(config: Config) -> str:
    """The effective configuration as TOML; ``loads(render(c)) == c``."""
    source = " ".join(config.source.splitlines())
    lines = [f"# mproxy effective configuration (from {source})"]
    for attr, section in SECTIONS:
        value = getattr(config, attr)
        tables = value if section.array else (value,)
        for table in tables:
            lines.append("")
            lines.append(f"[[{section.name}]]" if section.array else f"[{section.name}]")
            for f in dataclasses.fields(table):
                lines.append(f"{f.name} = {_toml_value(getattr(table, f.name))}")
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def docs_markdown() -> str:
    """The configuration reference (``docs/configuration.md``), from :data:`OPTIONS`."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from mproxy/config/ by `python scripts/gen_config_docs.py`; "
        "do not edit. -->",
        "",
        "mproxy reads one TOML file. Its format is a superset of "
        "the Rust Momento Proxy's (`momento-proxy`): those files load unchanged, ports may "
        "be integers or strings, and momento-proxy tuning keys that mean nothing here are "
        "accepted and ignored (listed under each section).",
        "",
        "- An invalid value stops the start with one line naming the file, the key, the "
        "value and what was expected, e.g. "
        '`proxy.toml: cache[0].port = "abc": expected an integer port 0-65535`.',
        "- Unknown sections and keys are not errors: each is logged as a warning naming "
        "the file and the key.",
        "- `SIGHUP` re-reads the file. Keys marked *live* in the Reload column take their "
        "new value at once; a changed key marked *restart* is logged as a warning and keeps "
        "its running value until the next start. A file that does not load is logged and "
        "changes nothing.",
        "- `config/proxy.toml` is a commented template with every key; `config/local.toml` "
        "runs on the bundled local Momento-compatible server, `config/memory.toml` on an "
        "in-process store.",
        "",
    ]
    for _, section in SECTIONS:
        header = f"[[{section.name}]]" if section.array else f"[{section.name}]"
        out += [f"## `{header}`", "", section.help, ""]
        out += ["| Key | Type | Default | Reload | Description |", "| --- | --- | --- | --- | --- |"]
        for option in OPTIONS:
            if option.section != section.name:
                continue
            default = "required" if option.required else f"`{_toml_value(option.default)}`"
            reload = "live" if option.reload else "restart"
            out.append(
                f"| `{option.key}` | {option.type_doc()} | {default} | {reload} | {_md_cell(option.help)} |"
            )
        if section.legacy:
            keys = ", ".join(f"`{k}`" for k in section.legacy)
            out += ["", f"Accepted from momento-proxy configs and ignored: {keys}."]
        out.append("")
    return "\n".join(out)
