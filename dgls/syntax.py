"""tree-sitter access: which parser serves an LSP language id, and what the syntax tree says.

Parsers come from `tree-sitter-language-pack` when it has the grammar locally, else from the per-language
grammar wheels (`tree-sitter-python`, `tree-sitter-javascript`, ...), else there is none and callers fall back
to plain text. Node-type tables cover Python, JavaScript, TypeScript, Go, Rust, Java, C and C++. No LSP, no
engine; the only state is the last tree parsed per document, so the next keystroke's parse is incremental
(a full parse of an 80 KB file is ~10 ms, an incremental one under 1 ms). Parsing is serialised by one lock:
a parser is not safe to share between threads, and callers run on the event loop or in worker threads.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import threading
from typing import Any

log = logging.getLogger("dgls.syntax")

# LSP language id -> tree-sitter grammar name.
GRAMMARS = {
    "python": "python", "javascript": "javascript", "javascriptreact": "javascript", "typescript": "typescript",
    "typescriptreact": "tsx", "go": "go", "rust": "rust", "java": "java", "c": "c", "cpp": "cpp", "cuda-cpp": "cpp",
}
# Grammar name -> (module of the per-language wheel, its language function).
WHEELS = {
    "python": ("tree_sitter_python", "language"), "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"), "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"), "java": ("tree_sitter_java", "language"),
    "c": ("tree_sitter_c", "language"), "cpp": ("tree_sitter_cpp", "language"),
}
# Extensions for documents whose language id is unknown (e.g. "plaintext" for a .py file opened oddly).
EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascript", ".ts": "typescript", ".tsx": "tsx", ".go": "go", ".rs": "rust", ".java": "java",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp",
}

DEFINITIONS = {
    "function_definition", "class_definition", "function_declaration", "method_definition", "class_declaration",
    "method_declaration", "constructor_declaration", "interface_declaration", "enum_declaration", "function_item",
    "impl_item", "trait_item", "mod_item", "struct_item", "enum_item", "class_specifier", "struct_specifier",
    "namespace_definition", "abstract_class_declaration", "generator_function_declaration", "record_declaration",
}
IMPORTS = {
    "import_statement", "import_from_statement", "future_import_statement", "import_declaration",
    "preproc_include", "use_declaration", "package_clause", "package_declaration", "using_declaration",
    "extern_crate_declaration",
}
BLOCKS = {
    "block", "module", "program", "source_file", "translation_unit", "compound_statement", "statement_block",
    "declaration_list", "class_body", "field_declaration_list", "interface_body", "enum_body", "constructor_body",
    "switch_body", "switch_block", "function_body", "class_definition", "function_definition", "if_statement",
    "for_statement", "while_statement", "with_statement", "try_statement",
}
EXPRESSION_WORDS = (
    "argument", "parameter", "list", "array", "tuple", "dictionary", "object", "subscript", "parenthesized",
    "string", "template", "call", "binary", "comparison", "boolean", "lambda", "conditional_expression",
)


def grammar_for(language_id: str, path: str = "") -> str | None:
    """The grammar name for a document, or None for plain text."""
    grammar = GRAMMARS.get(language_id)
    if grammar is None and path:
        dot = path.rfind(".")
        grammar = EXTENSIONS.get(path[dot:].lower()) if dot >= 0 else None
    return grammar


@functools.cache
def parser_for(grammar: str | None) -> Any | None:
    """A tree-sitter Parser for `grammar`, or None when no grammar is installed (callers use plain text)."""
    if grammar is None:
        return None
    try:
        import tree_sitter
    except ImportError:
        return None
    try:
        import tree_sitter_language_pack as pack

        if grammar in (pack.downloaded_languages() or []):
            return pack.get_parser(grammar)
    except Exception:  # the pack downloads grammars on demand; offline it has none
        pass
    module_name, function = WHEELS.get(grammar, (f"tree_sitter_{grammar}", "language"))
    try:
        module = importlib.import_module(module_name)
        return tree_sitter.Parser(tree_sitter.Language(getattr(module, function)()))
    except Exception as exc:
        log.info("no tree-sitter grammar for %s (%s); using plain text", grammar, exc)
        return None


RECENT_TREES = 32  # documents whose last tree is kept for incremental parsing
_parse_lock = threading.Lock()
_recent: collections.OrderedDict[tuple[int, str], tuple[bytes, Any]] = collections.OrderedDict()


def parse(parser: Any, data: bytes, document: str | None = None) -> Any | None:
    """The tree of `data`. With a `document` key, the last tree parsed under that key is edited to match
    `data` (found by comparing the bytes) and reparsed incrementally; the result is the same tree a full
    parse gives."""
    key = (id(parser), document or "")
    with _parse_lock:
        try:
            previous = _recent.get(key) if document is not None else None
            if previous is None:
                tree = parser.parse(data)
            else:
                old_data, old_tree = previous
                if old_data == data:
                    return old_tree
                edited = old_tree.copy()  # earlier callers may still be reading the old tree's nodes
                edited.edit(**edit_between(old_data, data))
                tree = parser.parse(data, edited)
        except Exception:  # a grammar that chokes on odd bytes: treat as plain text
            return None
        if document is not None:
            _recent[key] = (data, tree)
            _recent.move_to_end(key)
            while len(_recent) > RECENT_TREES:
                _recent.popitem(last=False)
        return tree


def edit_between(old: bytes, new: bytes) -> dict[str, Any]:
    """The tree-sitter edit (bytes and points) that turns `old` into `new`: the span between their common
    prefix and common suffix."""
    limit = min(len(old), len(new))
    start = _common_prefix(old, new, limit)
    tail = _common_prefix(old[::-1], new[::-1], limit - start)
    old_end, new_end = len(old) - tail, len(new) - tail
    return {
        "start_byte": start, "old_end_byte": old_end, "new_end_byte": new_end,
        "start_point": _point(old, start), "old_end_point": _point(old, old_end),
        "new_end_point": _point(new, new_end),
    }


def _common_prefix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the longest common prefix of `a` and `b`, at most `limit` (binary search over C compares)."""
    low, high = 0, limit
    view_a, view_b = memoryview(a), memoryview(b)
    while low < high:
        middle = (low + high + 1) // 2
        if view_a[low:middle] == view_b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _point(data: bytes, offset: int) -> tuple[int, int]:
    return data.count(b"\n", 0, offset), offset - (data.rfind(b"\n", 0, offset) + 1)


def error_count(parser: Any, text: str) -> int:
    """How many ERROR and MISSING nodes the parse of `text` has (0 for a clean parse)."""
    tree = parse(parser, text.encode("utf-8", "replace"))
    if tree is None:
        return 0
    count = 0
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            count += 1
        if node.has_error:
            stack.extend(node.children)
    return count


def ancestors(node: Any) -> list[Any]:
    """`node` and its ancestors, innermost first."""
    chain = []
    while node is not None:
        chain.append(node)
        node = node.parent
    return chain


def classify(node_type: str) -> str | None:
    """'block' for statement containers, 'expression' for bracketed or partial expressions, None otherwise."""
    if node_type in BLOCKS:
        return "block"
    if node_type == "ERROR":
        return None
    if any(word in node_type for word in EXPRESSION_WORDS):
        return "expression"
    return None
