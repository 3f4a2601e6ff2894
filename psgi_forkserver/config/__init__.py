"""Vassal files: discovery, the [uwsgi] INI reader, Jinja2 templates, the
option declaration and its judge, base detection, fingerprints.

A vassal is `NAME.ini`, or `NAME.ini.j2`: a Jinja2 template rendered before
use (see `render_template`). Both for one NAME is an error of that vassal.
One concern a module; this package's namespace is what the rest of the
Emperor uses.
"""

from .discovery import (MAX_FILE, SUFFIX, TEMPLATE_SUFFIX, TRANSIENT_ERRNOS, ReadStatuses,
                        Unreadable, candidates, discover, discover_paths, file_status, fingerprint, is_dropping,
                        is_template, is_vassal_file, read_vassal_file, vassal_name)
from .ini import SECTION, ConfigError, parse_ini, parse_ini_lines
from .options import (CHECKERS, OptionSpec, declared_options, emperor_keys, judge_options,
                      options_file, parse_address, parse_bool, parse_domain, parse_owner,
                      refused_options, unknown_option)
from .templates import TemplateFailure, render_template, template_context
from .vassalfile import BaseSelector, VassalConfig, load, routed_name

__all__ = [
    "MAX_FILE", "SUFFIX", "TEMPLATE_SUFFIX", "TRANSIENT_ERRNOS", "ReadStatuses", "Unreadable",
    "candidates", "file_status",
    "discover", "discover_paths", "fingerprint", "is_dropping", "is_template", "is_vassal_file",
    "read_vassal_file", "vassal_name", "SECTION", "ConfigError", "parse_ini",
    "parse_ini_lines", "CHECKERS", "OptionSpec", "declared_options", "emperor_keys",
    "judge_options", "options_file", "parse_address", "parse_bool", "parse_domain",
    "parse_owner", "refused_options", "unknown_option", "TemplateFailure",
    "render_template", "template_context", "BaseSelector", "VassalConfig", "load", "routed_name",
]
