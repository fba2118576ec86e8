"""Neovim 0.12 (Debian testing's .debs, unpacked by editors/scripts/install-nvim.sh) with the dgls plugin, driven
through its RPC socket (`nvim --server --remote-send/--remote-expr`) against the real `dgls lsp` and engine.

Ghost text must appear from the model while typing in a Python buffer, <Tab> must insert it, and :DglsRewrite
and :DglsFill must replace the selection with the server's non-empty text. Where to type and which lines to select
come from the scenario `editor_engine` chose for the model (tests/editors/conftest.py). Both inline backends run:
`native` (vim.lsp.inline_completion) and `extmarks` (the one Neovim 0.10/0.11 get). A remote TUI in tmux gives the
screenshot (editors/screenshots/nvim-ghost-text.png when DGLS_EDITOR_SCREENSHOTS=1). Skips, naming the reason, when
deb.debian.org cannot be reached (a failed install with the network up fails), or with DGLS_SKIP_EDITOR_TESTS=nvim.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.editors.conftest import (
    ROOT,
    SAMPLE,
    SCREENSHOTS,
    EditorEngine,
    dgls_cli,
    install,
    replacement,
    skip_unless_enabled,
    split_at,
)
from tests.editors.screen_png import render

pytestmark = skip_unless_enabled("nvim")
COLUMNS, ROWS = 90, 24
DEBIAN = "http://deb.debian.org/debian"  # install-nvim.sh's mirror


SUITES = {"testing": "0.12", "trixie": "0.10"}  # Debian suite -> the (oldest) Neovim version it ships


@pytest.fixture(scope="module")
def nvim_binaries() -> Callable[[str], Path]:
    found: dict[str, Path] = {}

    def binary(suite: str) -> Path:
        if suite not in found:
            values = install("install-nvim.sh", downloads_from=[DEBIAN], timeout=600, env={"DGLS_NVIM_SUITE": suite})
            found[suite] = Path(values["LAST"])
        return found[suite]

    return binary


def lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def vim_string(value: str) -> str:
    """A Vimscript double-quoted string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Nvim:
    """A headless Neovim with the plugin, plus (when tmux exists) a remote TUI to take screenshots of."""

    def __init__(self, binary: Path, workdir: Path, engine: EditorEngine, backend: str) -> None:
        self.binary, self.workdir = binary, workdir
        self.scenario = engine.scenario
        self.address = str(workdir / "nvim.sock")
        self.file = workdir / "sample.py"
        self.file.write_text(SAMPLE)
        init = workdir / "init.lua"
        init.write_text(f"""
vim.opt.rtp:prepend({lua_string(str(ROOT / "editors" / "nvim"))})
vim.cmd('runtime plugin/dgls.lua')
vim.o.termguicolors = true
vim.o.swapfile = false
function _G.dgls_statusline() return require('dgls').statusline() end
vim.o.statusline = ' %f %m%=%{{v:lua.dgls_statusline()}}  %l,%c '
vim.g.dgls_done = 0
vim.api.nvim_create_autocmd('User', {{ pattern = 'DglsCommandDone', callback = function(args)
  vim.g.dgls_result = args.data.result or {{}}
  vim.g.dgls_error = args.data.error and (args.data.error.message or 'error') or vim.NIL
  vim.g.dgls_done = vim.g.dgls_done + 1
end }})
require('dgls').setup({{
  cmd = {{ {lua_string(sys.executable)}, '-m', 'dgls', 'lsp' }},
  server = {{
    engine = {{ model = {lua_string(str(engine.model))}, socket = {lua_string(str(engine.socket))} }},
    deadlines = {{ automaticMs = 60000, invokedMs = 60000, rewriteMs = 120000 }},
    completion = {{ seed = {engine.seed} }},
  }},
  inline = {{ backend = {lua_string(backend)} }},
}})
""")
        env = dict(os.environ)
        for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
            env[name] = str(workdir / name.lower())
        self.env = env
        self.process = subprocess.Popen(
            [str(binary), "--headless", "--clean", "-n", "-u", str(init), "--listen", self.address, str(self.file)],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.tmux: str | None = None
        wait_for(lambda: Path(self.address).exists(), 20, "Neovim's RPC socket")

    def attach_tui(self) -> None:
        if shutil.which("tmux") is None:
            return
        self.tmux = f"dgls-nvim-{os.getpid()}"
        subprocess.run(["tmux", "-L", self.tmux, "new-session", "-d", "-s", "nvim", "-x", str(COLUMNS), "-y",
                        str(ROWS), f"{self.binary} --remote-ui --server {self.address}"], check=True, env=self.env)

    def send(self, keys: str) -> None:
        subprocess.run([str(self.binary), "--server", self.address, "--remote-send", keys], check=True,
                       env=self.env, timeout=20)

    def lua(self, expression: str) -> str:
        """The value of a Lua expression, as a string (tables through vim.inspect)."""
        code = f"(function() local v = {expression}; return type(v) == 'table' and vim.inspect(v) or tostring(v) end)()"
        result = subprocess.run([str(self.binary), "--server", self.address, "--remote-expr",
                                 f"luaeval({vim_string(code)})"], capture_output=True, text=True, env=self.env,
                                timeout=20)
        return result.stdout

    def screen(self) -> str:
        if self.tmux is None:
            return ""
        return subprocess.run(["tmux", "-L", self.tmux, "capture-pane", "-p", "-e", "-t", "nvim"],
                              capture_output=True, text=True).stdout

    def close(self) -> None:
        if self.tmux is not None:
            subprocess.run(["tmux", "-L", self.tmux, "kill-server"], capture_output=True)
        if self.process.poll() is None:
            try:
                self.send("<C-\\><C-n>:qa!<CR>")
                self.process.wait(timeout=10)
            except (subprocess.SubprocessError, OSError):
                self.process.kill()
                self.process.wait()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def nvim_factory(nvim_binaries: Callable[[str], Path], editor_engine: EditorEngine,
                 tmp_path: Path) -> Iterator[Callable[..., Nvim]]:
    sessions: list[Nvim] = []

    def start(backend: str, suite: str = "testing") -> Nvim:
        session = Nvim(nvim_binaries(suite), tmp_path, editor_engine, backend)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()


GHOST_NAMESPACES = {"native": "nvim.lsp.inline_completion", "extmarks": "dgls.ghost"}


def ghost_text(nvim: Nvim, backend: str) -> str:
    """The ghost text drawn in the buffer (first line + virtual lines), '' when none."""
    namespace = GHOST_NAMESPACES[backend]
    return nvim.lua(
        f"(function() local marks = vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_create_namespace('{namespace}'),"
        " 0, -1, { details = true }); local out = {}; for _, m in ipairs(marks) do"
        " for _, chunk in ipairs(m[4].virt_text or {}) do table.insert(out, chunk[1]) end"
        " for _, line in ipairs(m[4].virt_lines or {}) do table.insert(out, '\\n')"
        " for _, chunk in ipairs(line) do table.insert(out, chunk[1]) end end end"
        " return table.concat(out) end)()")


def wait_ready(nvim: Nvim) -> None:
    wait_for(lambda: nvim.lua("require('dgls.completion').attached()") == "true", 60, "the plugin to attach")
    wait_for(lambda: "ready" in nvim.lua("require('dgls').statusline()"), 300, "the engine to be ready")


def type_and_wait_for_ghost(nvim: Nvim, backend: str) -> str:
    nvim.send(f"<Esc>{nvim.scenario.type_line}GA")
    # Type one character at a time, as a person does (each change is a new automatic request).
    for char in nvim.scenario.typed:
        nvim.send(char)
        time.sleep(0.05)

    asked = [time.monotonic()]

    def visible() -> str:
        text = ghost_text(nvim, backend)
        if not text.strip() and time.monotonic() - asked[0] > 15:
            # No suggestion for this prefix yet: ask explicitly (invoked trigger, several candidates). Where the
            # model answers only such a request, the scenario says so (`explicit`).
            nvim.send("<M-]>")
            asked[0] = time.monotonic()
        return text if text.strip() else ""

    return wait_for(visible, 120, f"ghost text ({backend})")


def server_stats(nvim: Nvim) -> str:
    """The server's counters (the dgls.status command), as vim.inspect text."""
    nvim.lua("(function() vim.g.dgls_stats = nil; local c = require('dgls').client(); require('dgls').request(c,"
             " 'workspace/executeCommand', { command = 'dgls.status', arguments = {} },"
             " function(e, r) vim.g.dgls_stats = vim.inspect(r or e) end) end)()")
    return str(wait_for(lambda: (lambda v: v if v not in ("", "nil") else "")(nvim.lua("vim.g.dgls_stats")), 20,
                        "the dgls.status command"))


@pytest.mark.parametrize(("suite", "backend", "key"), [
    ("testing", "native", "<Tab>"), ("testing", "extmarks", "<M-Right>"), ("trixie", "auto", "<Tab>")])
def test_ghost_text_appears_and_is_accepted(nvim_factory: Callable[..., Nvim], suite: str, backend: str,
                                            key: str) -> None:
    """0.12 with both backends; 0.10 with 'auto', which must pick the extmarks backend there. <Tab> accepts the
    whole suggestion (the server counts it through the item's command); <M-Right> its next word (the server
    counts it through dgls/didPartiallyAcceptCompletion)."""
    nvim = nvim_factory(backend, suite)
    nvim.attach_tui()
    wait_ready(nvim)
    minor = int(nvim.lua("vim.version().minor"))
    assert minor == 10 if suite == "trixie" else minor >= 12
    if backend == "auto":
        backend = nvim.lua("require('dgls.completion').backend()")
        assert backend == ("native" if suite == "testing" else "extmarks")
    ghost = type_and_wait_for_ghost(nvim, backend)
    if backend == "native":
        time.sleep(0.3)  # let the TUI redraw before the picture
        screen = nvim.screen()
        if screen:
            (nvim.workdir / "screen.ansi").write_text(screen)
            if os.environ.get("DGLS_EDITOR_SCREENSHOTS") == "1":
                render(screen, SCREENSHOTS / "nvim-ghost-text.png", COLUMNS, ROWS)
    row = nvim.scenario.type_line
    line_before = nvim.lua(f"vim.api.nvim_buf_get_lines(0, {row - 1}, {row}, false)[1]")
    nvim.send(key)
    if key == "<Tab>":
        expected = ghost.split("\n")[0]
    else:
        expected = nvim.lua(f"require('dgls.completion').take_word({lua_string(ghost)})").split("\n")[0]

    def accepted() -> bool:
        line = nvim.lua(f"vim.api.nvim_buf_get_lines(0, {row - 1}, {row}, false)[1]")
        return line == line_before + expected if expected else line != line_before

    wait_for(accepted, 10, f"{key} to insert the ghost text")
    text = nvim.lua("table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\\n')")
    if key == "<Tab>":
        assert nvim.scenario.typed + ghost in text.replace("\r", "")
    assert nvim.lua("vim.api.nvim_get_mode().mode") == "i"
    stats = server_stats(nvim)
    counter = "accepted" if key == "<Tab>" else "partiallyAccepted"
    assert f"{counter} = 1" in stats and "shown = 0" not in stats, stats
    # accepting was a keystroke after an automatic request: the server prefetched its fill on the didChange, and
    # the editor's next request (after its debounce) took it over
    wait_for(lambda: re.search(r"prefetchesUsed = [1-9]", server_stats(nvim)), 30,
             "the request after accepting to take over the prefetched fill")


def buffer_text(nvim: Nvim) -> str:
    return nvim.lua("table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\\n')")


def run_on_selection(nvim: Nvim, command: str, selection: tuple[int, int]) -> None:
    """Select `selection` of the sample (linewise), run `command` on it, and check that the server's non-empty
    text replaced it and nothing else changed."""
    first, last = selection
    assert buffer_text(nvim) + "\n" == SAMPLE
    done = int(nvim.lua("vim.g.dgls_done"))
    nvim.send(f"<Esc>{first}GV{'j' * (last - first)}:{command}<CR>")
    wait_for(lambda: nvim.lua("vim.g.dgls_done") == str(done + 1), 180, f":{command} to finish")
    assert nvim.lua("vim.g.dgls_error") in ("nil", "vim.NIL", ""), nvim.lua("vim.g.dgls_error")
    result = json.loads(nvim.lua("vim.json.encode(vim.g.dgls_result)") or "{}") or {}
    text = result.get("text") or ""
    assert result.get("applied") is True and text.strip(), f":{command} on lines {first}-{last}: {result}"
    assert text != split_at(selection)[1], f":{command} gave the selected text back: {result}"
    # The buffer is the sample with exactly the server's text in place of the selection.
    assert replacement(selection, buffer_text(nvim) + "\n") == text, (result, buffer_text(nvim))


def engine_pid(engine: EditorEngine) -> int | None:
    result = dgls_cli("engine", "status", "--json", "--socket", str(engine.socket), timeout=30)
    return json.loads(result.stdout).get("pid") if result.stdout.strip() else None


def test_rewrite_fill_health_and_restart(nvim_factory: Callable[..., Nvim], editor_engine: EditorEngine) -> None:
    nvim = nvim_factory("native")
    wait_ready(nvim)
    scenario = editor_engine.scenario
    run_on_selection(nvim, f"DglsRewrite {scenario.instruction}", scenario.rewrite_selection)
    nvim.send("<Esc>:edit!<CR>")  # back to the file on disk
    wait_for(lambda: buffer_text(nvim) == SAMPLE.rstrip("\n"), 10, "the file to reload")
    run_on_selection(nvim, "DglsFill", scenario.fill_selection)
    # :checkhealth dgls: server found, engine reachable, model loaded, Neovim version.
    nvim.send("<Esc>:checkhealth dgls<CR>")
    report = wait_for(lambda: (lambda text: text if "model loaded" in text else "")(
        nvim.lua("table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\\n')")), 30, ":checkhealth dgls")
    for expected in ("OK Neovim 0.1", "OK server command", "OK engine reachable", "OK model loaded"):
        assert expected in report, report
    # :DglsRestart stops the engine and restarts the server, which starts a new engine.
    before = engine_pid(editor_engine)
    nvim.send("<Esc>:bwipeout<CR>:DglsRestart<CR>")
    wait_for(lambda: engine_pid(editor_engine) not in (None, before), 120, "a new engine after :DglsRestart")
    wait_ready(nvim)


PURE_LUA_CHECKS = r"""
vim.opt.rtp:prepend(ROOT .. '/editors/nvim')
local completion = require('dgls.completion')
local config = require('dgls.config')
local position = require('dgls.position')
local checks = {
  { completion.take_word('  foo(bar)'), '  foo' },
  { completion.take_word('(bar)'), '(' },
  { completion.take_word('\n    return x'), '\n    return' },
  { completion.take_line('abc\ndef'), 'abc' },
  { completion.take_line('\n    def f():\n'), '\n    def f():' },
  { position.utf16_len('é𝄞x'), 4 },
  { position.to_lsp('aé𝄞b', 7, 'utf-16'), 4 },
  { position.to_byte('aé𝄞b', 4, 'utf-16'), 7 },
  { position.to_lsp('aé𝄞b', 7, 'utf-8'), 7 },
}
local options = config.setup({
  filetypes = { 'python' }, keymaps = { accept = false }, server = { engine = { device = 'cpu' } },
})
table.insert(checks, { table.concat(options.filetypes, ','), 'python' })
table.insert(checks, { options.keymaps.accept, false })
table.insert(checks, { options.keymaps.accept_word, '<M-Right>' })
table.insert(checks, { options.server.engine.device, 'cpu' })
table.insert(checks, { options.inline.backend, 'auto' })
for i, check in ipairs(checks) do
  assert(check[1] == check[2], ('check %d: %s ~= %s'):format(i, vim.inspect(check[1]), vim.inspect(check[2])))
end
io.write('ok\n')
"""


@pytest.mark.parametrize("suite", list(SUITES))
def test_partial_accept_and_options_helpers(nvim_binaries: Callable[[str], Path], suite: str, tmp_path: Path) -> None:
    script = tmp_path / "checks.lua"
    script.write_text(f"local ROOT = {lua_string(str(ROOT))}\n" + PURE_LUA_CHECKS)
    result = subprocess.run([str(nvim_binaries(suite)), "--headless", "--clean", "-l", str(script)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
